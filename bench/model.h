/* model.h: culoss-bench --model (bench/model.c). */
#ifndef CULOSS_BENCH_MODEL_H
#define CULOSS_BENCH_MODEL_H

/* Prints the traffic model; with check, returns 1 if a promised ratio is
   exceeded. 2: not an emulator build (nothing to count). */
int culoss_bench_model(int check);

#endif
