/* One multi-tensor pass for the prediction on CPU: lookahead_opt/native_kernel.py builds this
 * file with the machine's C compiler and calls it through ctypes. Per element, in the
 * tensor's dtype:
 *
 *   acc = W * wscale
 *   acc = fma(P_q, b_q, acc)                  q = 1..J   plain terms (torch.add with alpha)
 *   t   = sqrt(D + inner) + eps               DEN == 2   (DEN == 1: D + inner + eps)
 *   acc = acc + (a_q * N_q) / t               q = 1..K   with a denominator (torch.addcdiv)
 *   acc = fma(N_q, a_q, acc)                  q = 1..K   without one (torch.add with alpha)
 *   out = acc + shift
 *
 * the order and rounding of the per-tensor out= ops of lookahead_opt/kernel.py (`_one`), which
 * skip a multiplication by 1 and additions of 0; here they are done (exact, but for the sign
 * of a zero). The file must be compiled with -ffp-contract=off so that nothing else is fused.
 * One function per (K, J, DEN), K, J <= 2, so that each is a single vectorised loop.
 *
 * Tensors are cut into blocks of `block` elements shared by `nthreads` OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef void (*range_fn)(void *const *row, int64_t lo, int64_t hi, const void *coef);

/* coef: wscale, shift, inner, eps, a_1..a_K, b_1..b_J (already in T). row: out, W, N_1..N_K,
 * P_1..P_J[, D]. */
#define DEFINE_RANGE(T, SUF, SQRT, FMA, K, J, DEN)                                            \
    static void range_##SUF##_##K##J##DEN(void *const *row, int64_t lo, int64_t hi,          \
                                          const void *coef) {                                 \
        const T *c = (const T *)coef;                                                         \
        T *out = (T *)row[0];                                                        \
        const T *w = (const T *)row[1];                                              \
        const T *n1 = K >= 1 ? (const T *)row[2] : w;                                \
        const T *n2 = K >= 2 ? (const T *)row[3] : w;                                \
        const T *p1 = J >= 1 ? (const T *)row[2 + K] : w;                            \
        const T *p2 = J >= 2 ? (const T *)row[3 + K] : w;                            \
        const T *d = DEN ? (const T *)row[2 + K + J] : w;                            \
        const T ws = c[0], shift = c[1], inner = c[2], eps = c[3];                            \
        const T a1 = K >= 1 ? c[4] : 0, a2 = K >= 2 ? c[5] : 0;                               \
        const T b1 = J >= 1 ? c[4 + K] : 0, b2 = J >= 2 ? c[5 + K] : 0;                       \
        for (int64_t i = lo; i < hi; ++i) {                                                   \
            T acc = w[i] * ws;                                                                \
            if (J >= 1) acc = FMA(p1[i], b1, acc);                                            \
            if (J >= 2) acc = FMA(p2[i], b2, acc);                                            \
            if (DEN && K >= 1) {                                                              \
                T t = d[i] + inner;                                                           \
                if (DEN == 2) t = SQRT(t);                                                    \
                t = t + eps;                                                                  \
                acc = acc + a1 * n1[i] / t;                                                   \
                if (K >= 2) acc = acc + a2 * n2[i] / t;                                       \
            } else {                                                                          \
                if (K >= 1) acc = FMA(n1[i], a1, acc);                                        \
                if (K >= 2) acc = FMA(n2[i], a2, acc);                                        \
            }                                                                                 \
            out[i] = acc + shift;                                                             \
        }                                                                                     \
    }

#define DEFINE_DEN(T, SUF, SQRT, FMA, K, J)                                                  \
    DEFINE_RANGE(T, SUF, SQRT, FMA, K, J, 0)                                                  \
    DEFINE_RANGE(T, SUF, SQRT, FMA, K, J, 1)                                                  \
    DEFINE_RANGE(T, SUF, SQRT, FMA, K, J, 2)
#define DEFINE_J(T, SUF, SQRT, FMA, K)                                                       \
    DEFINE_DEN(T, SUF, SQRT, FMA, K, 0)                                                       \
    DEFINE_DEN(T, SUF, SQRT, FMA, K, 1)                                                       \
    DEFINE_DEN(T, SUF, SQRT, FMA, K, 2)
#define DEFINE_ALL(T, SUF, SQRT, FMA)                                                        \
    DEFINE_J(T, SUF, SQRT, FMA, 0)                                                            \
    DEFINE_J(T, SUF, SQRT, FMA, 1)                                                            \
    DEFINE_J(T, SUF, SQRT, FMA, 2)

DEFINE_ALL(float, f32, sqrtf, fmaf)
DEFINE_ALL(double, f64, sqrt, fma)

#define ROW(SUF, K) range_##SUF##_##K##00, range_##SUF##_##K##01, range_##SUF##_##K##02,      \
                    range_##SUF##_##K##10, range_##SUF##_##K##11, range_##SUF##_##K##12,      \
                    range_##SUF##_##K##20, range_##SUF##_##K##21, range_##SUF##_##K##22
static const range_fn RANGES[2][27] = {{ROW(f32, 0), ROW(f32, 1), ROW(f32, 2)},
                                       {ROW(f64, 0), ROW(f64, 1), ROW(f64, 2)}};

/* Which tensor block b belongs to: the last t with starts[t] <= b (starts[nt] > b). */
static int64_t owner(const int64_t *starts, int64_t nt, int64_t b) {
    int64_t lo = 0, hi = nt;
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (starts[mid] <= b) lo = mid; else hi = mid;
    }
    return lo;
}

/* Evaluate nt tensors; row t of `ptrs` has 2 + k + j (+1 with a denominator) pointers.
 * dtype 0: float32, 1: float64; den 0: none, 1: D, 2: sqrt(D); k, j <= 2; coef as above in
 * double. Returns 0, -1 for arguments out of range, -2 if the block table could not be allocated. */
int lookahead_predict(int dtype, int64_t nt, const int64_t *numels, void *const *ptrs, int k,
                      int j, int den, const double *coef, int64_t block, int nthreads) {
    if (dtype < 0 || dtype > 1 || k < 0 || k > 2 || j < 0 || j > 2 || den < 0 || den > 2 || block < 1)
        return -1;
    int ncols = 2 + k + j + (den != 0);
    range_fn fn = RANGES[dtype][k * 9 + j * 3 + den];
    float cf[8];
    double cd[8];
    for (int i = 0; i < 4 + k + j; ++i) { cf[i] = (float)coef[i]; cd[i] = coef[i]; }
    const void *c = dtype == 0 ? (const void *)cf : (const void *)cd;
    int64_t *starts = (int64_t *)malloc((size_t)(nt + 1) * sizeof(int64_t));
    if (starts == NULL) return -2;
    starts[0] = 0;
    for (int64_t t = 0; t < nt; ++t) starts[t + 1] = starts[t] + (numels[t] + block - 1) / block;
    int64_t nb = starts[nt];
    if (nb < 2) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < nb; ++b) {
        int64_t t = owner(starts, nt, b);
        int64_t lo = (b - starts[t]) * block;
        int64_t hi = lo + block < numels[t] ? lo + block : numels[t];
        fn(ptrs + t * ncols, lo, hi, c);
    }
    free(starts);
    return 0;
}
