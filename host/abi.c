/*
 * abi.c: the published ABI, pinned at compile time. Status numbers, enum
 * values and the size and field offsets of every public struct are fixed
 * once released (include/culoss.h, "ABI"): outside code builds these
 * structs field by field and the library copies them whole, so a changed
 * layout would misread an older caller's struct. A change here fails the
 * build; the fix is a new struct and a new entry point, never an edit.
 * (Offsets are those of LP64 platforms, where culoss is built.)
 */
#include <stddef.h>
#include <stdint.h>

#include "culoss.h"

#define PIN(cond) _Static_assert(cond, #cond)

PIN(CULOSS_OK == 0 && CULOSS_ERROR_INVALID_VALUE == 1 && CULOSS_ERROR_TARGET_OUT_OF_RANGE == 2);
PIN(CULOSS_ERROR_NOT_SUPPORTED == 3 && CULOSS_ERROR_NO_DEVICE == 4);
PIN(CULOSS_ERROR_OUT_OF_MEMORY == 5 && CULOSS_ERROR_CUDA == 6 && CULOSS_ERROR_CUBLAS == 7);
PIN(CULOSS_ERROR_INTERNAL == 8);
PIN(CULOSS_BACKEND_CPU == 0 && CULOSS_BACKEND_CUDA == 1);
PIN(CULOSS_F32 == 0 && CULOSS_F16 == 1 && CULOSS_BF16 == 2);
PIN(CULOSS_I32 == 0 && CULOSS_I64 == 1);
PIN(CULOSS_REDUCTION_NONE == 0 && CULOSS_REDUCTION_SUM == 1 && CULOSS_REDUCTION_MEAN == 2);
PIN(CULOSS_REDUCTION_BATCHMEAN == 3);
PIN(sizeof(culoss_reduction) == sizeof(int) && sizeof(culoss_dtype) == sizeof(int));

#if UINTPTR_MAX == UINT64_MAX
#define FIELD(s, f, off) PIN(offsetof(s, f) == (off))

PIN(sizeof(culoss_cross_entropy_options) == 48);
FIELD(culoss_cross_entropy_options, reduction, 0);
FIELD(culoss_cross_entropy_options, ignore_index, 8);
FIELD(culoss_cross_entropy_options, label_smoothing, 16);
FIELD(culoss_cross_entropy_options, class_weight, 24);
FIELD(culoss_cross_entropy_options, z_loss, 32);
FIELD(culoss_cross_entropy_options, logit_softcap, 36);
FIELD(culoss_cross_entropy_options, normalizer, 40);

PIN(sizeof(culoss_bce_options) == 24);
FIELD(culoss_bce_options, reduction, 0);
FIELD(culoss_bce_options, weight, 8);
FIELD(culoss_bce_options, pos_weight, 16);

PIN(sizeof(culoss_hinge_options) == 12);
FIELD(culoss_hinge_options, reduction, 0);
FIELD(culoss_hinge_options, margin, 4);
FIELD(culoss_hinge_options, squared, 8);

PIN(sizeof(culoss_multi_margin_options) == 24);
FIELD(culoss_multi_margin_options, reduction, 0);
FIELD(culoss_multi_margin_options, p, 4);
FIELD(culoss_multi_margin_options, margin, 8);
FIELD(culoss_multi_margin_options, class_weight, 16);

PIN(sizeof(culoss_regression_options) == 12);
FIELD(culoss_regression_options, reduction, 0);
FIELD(culoss_regression_options, delta, 4);
FIELD(culoss_regression_options, beta, 8);

PIN(sizeof(culoss_kl_div_options) == 8);
FIELD(culoss_kl_div_options, reduction, 0);
FIELD(culoss_kl_div_options, log_target, 4);
PIN(sizeof(culoss_hinge_embedding_options) == 8);
FIELD(culoss_hinge_embedding_options, reduction, 0);
FIELD(culoss_hinge_embedding_options, margin, 4);
PIN(sizeof(culoss_soft_margin_options) == 4);
FIELD(culoss_soft_margin_options, reduction, 0);
PIN(sizeof(culoss_poisson_nll_options) == 16);
FIELD(culoss_poisson_nll_options, reduction, 0);
FIELD(culoss_poisson_nll_options, log_input, 4);
FIELD(culoss_poisson_nll_options, full, 8);
FIELD(culoss_poisson_nll_options, eps, 12);
PIN(sizeof(culoss_sigmoid_focal_options) == 12);
FIELD(culoss_sigmoid_focal_options, reduction, 0);
FIELD(culoss_sigmoid_focal_options, alpha, 4);
FIELD(culoss_sigmoid_focal_options, gamma, 8);
PIN(sizeof(culoss_margin_ranking_options) == 8);
FIELD(culoss_margin_ranking_options, reduction, 0);
FIELD(culoss_margin_ranking_options, margin, 4);
PIN(sizeof(culoss_gaussian_nll_options) == 12);
FIELD(culoss_gaussian_nll_options, reduction, 0);
FIELD(culoss_gaussian_nll_options, full, 4);
FIELD(culoss_gaussian_nll_options, eps, 8);
PIN(sizeof(culoss_cosine_embedding_options) == 8);
FIELD(culoss_cosine_embedding_options, reduction, 0);
FIELD(culoss_cosine_embedding_options, margin, 4);
PIN(sizeof(culoss_triplet_margin_options) == 20);
FIELD(culoss_triplet_margin_options, reduction, 0);
FIELD(culoss_triplet_margin_options, margin, 4);
FIELD(culoss_triplet_margin_options, p, 8);
FIELD(culoss_triplet_margin_options, eps, 12);
FIELD(culoss_triplet_margin_options, swap, 16);
PIN(sizeof(culoss_info_nce_options) == 24);
FIELD(culoss_info_nce_options, reduction, 0);
FIELD(culoss_info_nce_options, symmetric, 4);
FIELD(culoss_info_nce_options, temperature, 8);
FIELD(culoss_info_nce_options, grad_temperature, 16);
PIN(sizeof(culoss_multilabel_margin_options) == 4);
FIELD(culoss_multilabel_margin_options, reduction, 0);
PIN(sizeof(culoss_multilabel_soft_margin_options) == 24);
FIELD(culoss_multilabel_soft_margin_options, reduction, 0);
FIELD(culoss_multilabel_soft_margin_options, weight, 8);
FIELD(culoss_multilabel_soft_margin_options, weight_per_row, 16);

PIN(sizeof(culoss_linear_ce_options) == 24);
FIELD(culoss_linear_ce_options, grad_weight_dtype, 0);
FIELD(culoss_linear_ce_options, accumulate, 4);
FIELD(culoss_linear_ce_options, lse, 8);
FIELD(culoss_linear_ce_options, entropy, 16);

PIN(sizeof(culoss_vocab_parallel) == 40);
FIELD(culoss_vocab_parallel, rank, 0);
FIELD(culoss_vocab_parallel, ranks, 4);
FIELD(culoss_vocab_parallel, v_begin, 8);
FIELD(culoss_vocab_parallel, v_total, 16);
FIELD(culoss_vocab_parallel, allgather, 24);
FIELD(culoss_vocab_parallel, user, 32);
PIN(CULOSS_VOCAB_PARALLEL_RECORD_BYTES == 32);

PIN(sizeof(culoss_ce_row_outputs) == 16);
FIELD(culoss_ce_row_outputs, lse, 0);
FIELD(culoss_ce_row_outputs, entropy, 8);

PIN(CULOSS_DISTILL_JSD == 0 && CULOSS_DISTILL_TVD == 1);
PIN(sizeof(culoss_distill_options) == 40);
FIELD(culoss_distill_options, divergence, 0);
FIELD(culoss_distill_options, beta, 4);
FIELD(culoss_distill_options, temperature, 8);
FIELD(culoss_distill_options, reduction, 12);
FIELD(culoss_distill_options, ignore_index, 16);
FIELD(culoss_distill_options, weight_soft, 24);
FIELD(culoss_distill_options, weight_hard, 28);
FIELD(culoss_distill_options, hard_options, 32);
#endif
