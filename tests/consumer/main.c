/* Links against an installed culoss and checks one known value. */
#include <culoss.h>
#include <math.h>
#include <stdio.h>

int main(void) {
  culoss_context *ctx;
  const float x[3] = {1.0f, 2.0f, 3.0f};
  const int64_t t[1] = {2};
  float loss;
  if (culoss_create(&ctx, CULOSS_BACKEND_CPU, 0) != CULOSS_OK) return 1;
  if (culoss_cross_entropy(ctx, NULL, 1, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, NULL, NULL) !=
      CULOSS_OK)
    return 2;
  culoss_destroy(ctx);
  if (fabs(loss - 0.40760596) > 1e-6) return 3;
  printf("consumer ok: culoss %d, loss %.6f\n", culoss_version(), (double)loss);
  return 0;
}
