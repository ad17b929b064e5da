/*
 * emu_traffic.h: the CPU emulator's global-memory traffic counters, for the
 * traffic model (`culoss-bench --model`, bench/NOTES.md). C and C++.
 *
 * Between culoss_emu_traffic_begin and culoss_emu_traffic_end, every global
 * load and store a kernel issues through load_pack / store_pack and the
 * scalar ld_elem / st_elem of common/dtype.cuh is counted: the bytes
 * requested (re-reads included) and the distinct 32-byte sectors touched
 * (the union over every launch in the window), reads and writes apart.
 * Per-row scalars the kernels read or write directly (targets, class
 * weights, per-row losses, the context scratch) are not counted. A model
 * input: the emulator knows nothing of caches or timing.
 */
#ifndef CULOSS_EMU_TRAFFIC_H
#define CULOSS_EMU_TRAFFIC_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  uint64_t read_bytes, write_bytes;     /* requested, re-reads included */
  uint64_t read_sectors, write_sectors; /* distinct 32-byte sectors */
  uint64_t launches;                    /* kernels run in the window */
} culoss_emu_traffic;

void culoss_emu_traffic_begin(void);
void culoss_emu_traffic_end(culoss_emu_traffic *out);

#ifdef __cplusplus
}
#endif

#endif /* CULOSS_EMU_TRAFFIC_H */
