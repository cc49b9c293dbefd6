/*
 * Compiled CPU kernels of gmmrefine, called through ctypes (gmmrefine/native.py).
 *
 * Fourier insertion (gmm_insert_slices): on a CPU the vectorised torch insertion writes an index and
 * a weight for each of the 8 corners of every sample to memory and then scatters them; at box 128
 * moving those temporaries is most of its time. Here each sample's corners are computed in registers
 * and added straight into the grids, with exactly the float32 arithmetic of the torch path (no FMA
 * contraction: built with -ffp-contract=off).
 *
 * The grids (~100 MB at box 128) do not fit in a core's cache, so a sample's 8 corners are 8 cache
 * misses when samples come in image order. The samples of a group of views are therefore binned by
 * the z plane they fall on (a stable counting sort), and inserted tile of planes by tile of planes:
 * a tile's planes stay in cache while its samples are added. Each voxel's sum then runs over the
 * same samples in another order than the torch path's, so the grids agree to float32 rounding, not
 * bit for bit; the order is fixed, so a run repeats exactly.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* sincos */
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Portable across GCC, Clang and MSVC: OpenMP where the build enabled it (setup.py tries), else the
 * same loops run serially; thread-local work space and exported symbols per compiler. */
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#if defined(_MSC_VER)
#define THREAD_LOCAL __declspec(thread)
#define GMM_EXPORT __declspec(dllexport)
#else
#define THREAD_LOCAL __thread
#define GMM_EXPORT __attribute__((visibility("default")))
#endif

/* i mod n in 0..n-1 (Python's remainder); one comparison for the usual |i| <= n. */
static inline int64_t wrap_index(int64_t i, int64_t n) {
    if ((uint64_t)i < (uint64_t)n) return i; /* 0 <= i < n */
    const int64_t j = i + n;
    if ((uint64_t)j < (uint64_t)n) return j; /* -n <= i < 0 */
    const int64_t r = i % n;
    return r < 0 ? r + n : r;
}

/* Spread one sample with trilinear weights (z-y-x corner order, as the torch path). */
static inline void add_sample(float *data, float *weight, float px, float py, float pz, float re,
                              float im, float w, int64_t size, int64_t half, int64_t plane) {
    float bx = floorf(px), by = floorf(py), bz = floorf(pz);
    float fx = px - bx, fy = py - by, fz = pz - bz;
    int64_t x0 = (int64_t)bx, y0 = (int64_t)by, z0 = (int64_t)bz;
    /* x0 + 1 exceeds the last plane only when fx == 0, where its weight is 0 anyway (x0 >= 0: the
     * sample was folded to px >= 0). */
    int64_t xs[2] = {x0 < half - 1 ? x0 : half - 1, x0 + 1 < half - 1 ? x0 + 1 : half - 1};
    /* Rows and planes wrap (index -k is Dp - k), as torch.remainder does in the torch path. */
    int64_t ys[2] = {wrap_index(y0, size) * half, wrap_index(y0 + 1, size) * half};
    int64_t zs[2] = {wrap_index(z0, size) * plane, wrap_index(z0 + 1, size) * plane};
    float wx[2] = {1.0f - fx, fx}, wy[2] = {1.0f - fy, fy}, wz[2] = {1.0f - fz, fz};
    for (int dz = 0; dz < 2; dz++) {
        for (int dy = 0; dy < 2; dy++) {
            float wzy = wz[dz] * wy[dy];
            int64_t rzy = zs[dz] + ys[dy];
            for (int dx = 0; dx < 2; dx++) {
                float t = wzy * wx[dx];
                int64_t i = rzy + xs[dx];
                data[2 * i] += t * re;
                data[2 * i + 1] += t * im;
                weight[i] += t * w;
            }
        }
    }
}

/* Position of sample (kx, ky) of a view on the padded grid, Dp * (kx A[0] + ky A[1]), mate folded. */
static inline int fold_position(const float *a, float kx, float ky, float fsize, float *px, float *py,
                                float *pz) {
    *px = fsize * (kx * a[0] + ky * a[3]);
    *py = fsize * (kx * a[1] + ky * a[4]);
    *pz = fsize * (kx * a[2] + ky * a[5]);
    if (*px < 0) { /* store the Hermitian mate: -k, conjugate value */
        *px = -*px;
        *py = -*py;
        *pz = -*pz;
        return 1;
    }
    return 0;
}

/*
 * Add central slices into the accumulator grids, in place.
 *
 * data:   (Dp * Dp * H) complex grid as interleaved float32 real, imaginary (H = Dp / 2 + 1)
 * weight: (Dp * Dp * H) float32 weight grid
 * values: (P, M) complex samples of each particle as interleaved float32
 * wts:    (P, M) float32 weight of each sample
 * mats:   (V, 3, 3) float32 rotation of each view; view_particle: (V,) its particle
 * freqs:  (M, 2) float32 (kx, ky) of the samples, cycles per original pixel
 * size:   Dp; group: views binned together; tile: planes per bin
 * Returns 0, or -1 when the work space cannot be allocated (nothing is added then).
 */
GMM_EXPORT int gmm_insert_slices(float *data, float *weight, const float *values, const float *wts,
                      const float *mats, const int64_t *view_particle, int64_t nviews,
                      const float *freqs, int64_t nsamples, int64_t size, int64_t group,
                      int64_t tile) {
    const int64_t half = size / 2 + 1, plane = size * half;
    const float fsize = (float)size;
    const int64_t nbins = size / tile + 1;
    if (group < 1) group = 1;
    if (group > nviews) group = nviews;
    float *rec = malloc(sizeof(float) * 6 * (size_t)(group * nsamples));
    int32_t *bin = malloc(sizeof(int32_t) * (size_t)(group * nsamples));
    int64_t *start = malloc(sizeof(int64_t) * (size_t)(nbins + 1));
    if (!rec || !bin || !start) {
        free(rec);
        free(bin);
        free(start);
        return -1;
    }
    for (int64_t v0 = 0; v0 < nviews; v0 += group) {
        int64_t nv = nviews - v0 < group ? nviews - v0 : group;
        for (int64_t b = 0; b <= nbins; b++) start[b] = 0;
        /* pass 1: bin of every sample by its lower z plane (as stored: wrapped) */
        for (int64_t j = 0; j < nv; j++) {
            const float *a = mats + 9 * (v0 + j);
            for (int64_t m = 0; m < nsamples; m++) {
                float px, py, pz;
                fold_position(a, freqs[2 * m], freqs[2 * m + 1], fsize, &px, &py, &pz);
                int32_t b = (int32_t)(wrap_index((int64_t)floorf(pz), size) / tile);
                bin[j * nsamples + m] = b;
                start[b + 1]++;
            }
        }
        for (int64_t b = 0; b < nbins; b++) start[b + 1] += start[b];
        /* pass 2: each sample's record written into its bin, in view then sample order */
        for (int64_t j = 0; j < nv; j++) {
            const float *a = mats + 9 * (v0 + j);
            int64_t p = view_particle[v0 + j];
            const float *val = values + 2 * p * nsamples, *wt = wts + p * nsamples;
            for (int64_t m = 0; m < nsamples; m++) {
                float px, py, pz;
                int mate = fold_position(a, freqs[2 * m], freqs[2 * m + 1], fsize, &px, &py, &pz);
                float *r = rec + 6 * start[bin[j * nsamples + m]]++;
                r[0] = px;
                r[1] = py;
                r[2] = pz;
                r[3] = val[2 * m];
                r[4] = mate ? -val[2 * m + 1] : val[2 * m + 1];
                r[5] = wt[m];
            }
        }
        /* pass 3: insertion, bin by bin */
        for (int64_t s = 0; s < nv * nsamples; s++) {
            const float *r = rec + 6 * s;
            add_sample(data, weight, r[0], r[1], r[2], r[3], r[4], r[5], size, half, plane);
        }
    }
    free(rec);
    free(bin);
    free(start);
    return 0;
}

/*
 * The fused separable projection (gmmrefine/gmm/project.py): per particle and chunk of Gaussians,
 * the tables are built in a thread's cache-resident scratch and consumed at once by the BLAS sgemm
 * torch links (its address comes from Python), so no table ever goes to memory and the backward
 * rebuilds them instead of saving them (16 N (K+1) bytes per particle).
 *
 * Scratch tables are transposed, (2 k1, nc) row-major, so that a vector of Gaussians is one
 * contiguous load or store: row 2n holds g_n cos(n t_j), row 2n + 1 holds g_n sin(n t_j), with
 * t = 2 pi f1 p and g_n = q^{n^2}, q = exp(-2 pi^2 s^2 f1^2). They are computed in double, across
 * lanes of Gaussians: one sin/cos per Gaussian (a polynomial, vectorised: libm's sincos is a scalar
 * call and cost as much as the products at K = 18), then e^{i(n+1)t} = e^{i n t} e^{i t} and
 * g_{n+1} = g_n r_n, r_{n+1} = r_n q^2.
 */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define TABLE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TABLE_CLONES
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define TABLE_LANES 64

/* sin and cos of t (|t| < 2^20 pi): t = k pi/2 + r, |r| <= pi/4, Taylor series to r^17 / r^16
 * (truncation < 5e-17), quadrant by selects; round-to-nearest by adding 1.5 2^52 keeps the loop
 * vectorisable without SSE4.1. */
static inline void sincos_lane(double t, double *s_out, double *c_out) {
    const double shifter = 6755399441055744.0, two_over_pi = 0.63661977236758134308;
    const double pio2_hi = 1.5707963267341256, pio2_lo = 6.077100506506192e-11;
    const double k = (t * two_over_pi + shifter) - shifter;
    const double r = (t - k * pio2_hi) - k * pio2_lo, r2 = r * r;
    const double s = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 +
                     r2 * (-1.0 / 39916800 + r2 * (1.0 / 6227020800.0 + r2 * (-1.0 / 1307674368000.0 +
                     r2 * (1.0 / 355687428096000.0)))))))));
    const double c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800 +
                     r2 * (1.0 / 479001600 + r2 * (-1.0 / 87178291200.0 + r2 * (1.0 / 20922789888000.0))))))));
    const double kq = (k * 0.25 + shifter) - shifter;
    const double quadrant = k - 4.0 * kq; /* -2..2; +-2 are the same quadrant */
    /* quadrant 0: (s, c); 1: (c, -s); +-2: (-s, -c); -1: (-c, s), as blends, not branches */
    const double odd = quadrant * quadrant == 1.0 ? 1.0 : 0.0;
    const double sin_sign = quadrant == 0.0 || quadrant == 1.0 ? 1.0 : -1.0;
    const double cos_sign = quadrant == 0.0 || quadrant == -1.0 ? 1.0 : -1.0;
    *s_out = sin_sign * (odd * c + (1.0 - odd) * s);
    *c_out = cos_sign * (odd * s + (1.0 - odd) * c);
}

/* Z <- Z V, V <- V q^{2M^2}, U <- U q^{2M} for lane l of the double anchors (see gmm_chunk_tables). */
static inline void advance_anchors(int64_t l, double *zxr, double *zxi, double *zyr, double *zyi, double *vxr,
                                   double *vxi, double *vyr, double *vyi, double *uxr, double *uxi, double *uyr,
                                   double *uyi, const double *qv, const double *qu) {
    const double zxr1 = zxr[l] * vxr[l] - zxi[l] * vxi[l], zyr1 = zyr[l] * vyr[l] - zyi[l] * vyi[l];
    zxi[l] = zxr[l] * vxi[l] + zxi[l] * vxr[l];
    zyi[l] = zyr[l] * vyi[l] + zyi[l] * vyr[l];
    zxr[l] = zxr1;
    zyr[l] = zyr1;
    vxr[l] *= qv[l];
    vxi[l] *= qv[l];
    vyr[l] *= qv[l];
    vyi[l] *= qv[l];
    uxr[l] *= qu[l];
    uxi[l] *= qu[l];
    uyr[l] *= qu[l];
    uyi[l] *= qu[l];
}

/* Transposed tables (ld floats per row) of nc Gaussians of one particle: xt from p_x, yt from p_y,
 * times the amplitude a = kappa amp s^3 when amp is not NULL. The image position of Gaussian j is
 * p = rows c_j + shift_A (rows: the first two rows of A, row-major); centers: (nc, 3) A; q: (nc,)
 * envelope ratios; amp, width: (nc,); w = 2 pi f1.
 *
 * With z_n = g_n e^{i n t} and u_n = q^{2n+1} e^{i t}: z_{n+1} = z_n u_n and u_{n+1} = u_n q^2, one
 * complex and two real float multiplies per entry. Rounding would grow along n, so every
 * TABLE_BLOCK entries z and u restart from double-precision anchors, advanced a block at a time:
 * Z_{n+M} = Z_n V_n, V_n = e^{iMt} q^{2Mn+M^2}, V_{n+M} = V_n q^{2M^2}, U_{n+M} = U_n q^{2M}.
 * Measured at K = 18: 2x faster than the whole recurrence in double, and as accurate at float32
 * output (the float steps add < TABLE_BLOCK roundings). */
#define TABLE_BLOCK 8
TABLE_CLONES
GMM_EXPORT void gmm_chunk_tables(const float *centers, const float *rows, double shift_x_A, double shift_y_A, const double *q,
                      const float *amp, const float *width, double kappa, int64_t nc, int64_t k1, double w,
                      float *xt, float *yt, int64_t ld) {
    const double r00 = rows[0], r01 = rows[1], r02 = rows[2], r10 = rows[3], r11 = rows[4], r12 = rows[5];
    /* double anchors per lane: Z, V, U of each axis (re, im), and the ratios q^{2M^2}, q^{2M} */
    double zxr[TABLE_LANES], zxi[TABLE_LANES], vxr[TABLE_LANES], vxi[TABLE_LANES], uxr[TABLE_LANES], uxi[TABLE_LANES];
    double zyr[TABLE_LANES], zyi[TABLE_LANES], vyr[TABLE_LANES], vyi[TABLE_LANES], uyr[TABLE_LANES], uyi[TABLE_LANES];
    double qv[TABLE_LANES], qu[TABLE_LANES];
    /* float state inside a block */
    float fxr[TABLE_LANES], fxi[TABLE_LANES], gxr[TABLE_LANES], gxi[TABLE_LANES];
    float fyr[TABLE_LANES], fyi[TABLE_LANES], gyr[TABLE_LANES], gyi[TABLE_LANES], fq2[TABLE_LANES];
    double amplitude[TABLE_LANES];
    for (int64_t l0 = 0; l0 < nc; l0 += TABLE_LANES) {
        const int64_t nl = nc - l0 < TABLE_LANES ? nc - l0 : TABLE_LANES;
        for (int64_t l = 0; l < nl; l++) {
            const float sj = width[l0 + l];
            amplitude[l] = amp ? (double)((float)kappa * amp[l0 + l] * (sj * sj * sj)) : 1.0;
        }
#pragma omp simd
        for (int64_t l = 0; l < nl; l++) {
            const int64_t j = l0 + l;
            const double cx0 = centers[3 * j], cy0 = centers[3 * j + 1], cz0 = centers[3 * j + 2];
            const double px = r00 * cx0 + r01 * cy0 + r02 * cz0 + shift_x_A;
            const double py = r10 * cx0 + r11 * cy0 + r12 * cz0 + shift_y_A;
            double sx, cx, sy, cy;
            sincos_lane(w * px, &sx, &cx);
            sincos_lane(w * py, &sy, &cy);
            /* e^{iMt} for M = 8 by three squarings; q^{M^2} = q^64, q^{2M^2} = q^128, q^{2M} = q^16 */
            const double ex2 = cx * cx - sx * sx, fx2 = 2.0 * cx * sx, ey2 = cy * cy - sy * sy, fy2 = 2.0 * cy * sy;
            const double ex4 = ex2 * ex2 - fx2 * fx2, fx4 = 2.0 * ex2 * fx2;
            const double ey4 = ey2 * ey2 - fy2 * fy2, fy4 = 2.0 * ey2 * fy2;
            const double ex = ex4 * ex4 - fx4 * fx4, fx = 2.0 * ex4 * fx4;
            const double ey = ey4 * ey4 - fy4 * fy4, fy = 2.0 * ey4 * fy4;
            const double q1 = q[j], q2 = q1 * q1, q4 = q2 * q2, q8 = q4 * q4, q16 = q8 * q8;
            const double q64 = (q16 * q16) * (q16 * q16);
            const double a = amplitude[l];
            zxr[l] = 1.0;
            zxi[l] = 0.0;
            zyr[l] = a;
            zyi[l] = 0.0;
            vxr[l] = ex * q64;
            vxi[l] = fx * q64;
            vyr[l] = ey * q64;
            vyi[l] = fy * q64;
            uxr[l] = cx * q1;
            uxi[l] = sx * q1;
            uyr[l] = cy * q1;
            uyi[l] = sy * q1;
            qv[l] = q64 * q64;
            qu[l] = q16;
            fq2[l] = (float)q2;
        }
        const int64_t full_blocks = k1 / TABLE_BLOCK;
        for (int64_t blk = 0; blk < full_blocks; blk++) {
            const int64_t n0 = blk * TABLE_BLOCK;
#pragma omp simd
            for (int64_t l = 0; l < nl; l++) {
                /* the block's float state stays in registers */
                float xr = (float)zxr[l], xi = (float)zxi[l], yr = (float)zyr[l], yi = (float)zyi[l];
                float gr = (float)uxr[l], gi = (float)uxi[l], hr = (float)uyr[l], hi = (float)uyi[l];
                const float ratio = fq2[l];
                advance_anchors(l, zxr, zxi, zyr, zyi, vxr, vxi, vyr, vyi, uxr, uxi, uyr, uyi, qv, qu);
#pragma GCC unroll 8
                for (int m = 0; m < TABLE_BLOCK; m++) {
                    float *xc = xt + 2 * (n0 + m) * ld + l0, *yc = yt + 2 * (n0 + m) * ld + l0;
                    xc[l] = xr;
                    xc[ld + l] = xi;
                    yc[l] = yr;
                    yc[ld + l] = yi;
                    const float xr1 = xr * gr - xi * gi, yr1 = yr * hr - yi * hi;
                    xi = xr * gi + xi * gr;
                    yi = yr * hi + yi * hr;
                    xr = xr1;
                    yr = yr1;
                    gr *= ratio;
                    gi *= ratio;
                    hr *= ratio;
                    hi *= ratio;
                }
            }
        }
        if (full_blocks * TABLE_BLOCK == k1) continue;
        /* the last, partial block: one pass over the lanes per entry */
#pragma omp simd
        for (int64_t l = 0; l < nl; l++) {
            fxr[l] = (float)zxr[l], fxi[l] = (float)zxi[l], fyr[l] = (float)zyr[l], fyi[l] = (float)zyi[l];
            gxr[l] = (float)uxr[l], gxi[l] = (float)uxi[l], gyr[l] = (float)uyr[l], gyi[l] = (float)uyi[l];
        }
        for (int64_t n = full_blocks * TABLE_BLOCK; n < k1; n++) {
            float *xc = xt + 2 * n * ld + l0, *xs = xc + ld, *yc = yt + 2 * n * ld + l0, *ys = yc + ld;
#pragma omp simd
            for (int64_t l = 0; l < nl; l++) {
                xc[l] = fxr[l];
                xs[l] = fxi[l];
                yc[l] = fyr[l];
                ys[l] = fyi[l];
                const float xr1 = fxr[l] * gxr[l] - fxi[l] * gxi[l], yr1 = fyr[l] * gyr[l] - fyi[l] * gyi[l];
                fxi[l] = fxr[l] * gxi[l] + fxi[l] * gxr[l];
                fyi[l] = fyr[l] * gyi[l] + fyi[l] * gyr[l];
                fxr[l] = xr1;
                fyr[l] = yr1;
                gxr[l] *= fq2[l];
                gxi[l] *= fq2[l];
                gyr[l] *= fq2[l];
                gyi[l] *= fq2[l];
            }
        }
    }
}

/* out[j] = (sum_n Re z_n, f1^2 sum_n n^2 Re z_n, 2 pi f1 sum_n n Im z_n), z_n = h_n tab_n, for
 * transposed (2 k1, ld) tables h and tab; out: (nc, 3). */
TABLE_CLONES
GMM_EXPORT void gmm_chunk_sums(const float *h, const float *tab, int64_t nc, int64_t k1, int64_t ld, double f1, float *out) {
    float s0[TABLE_LANES], s1[TABLE_LANES], s2[TABLE_LANES];
    const float w1 = (float)(f1 * f1), w2 = (float)(2.0 * 3.14159265358979323846 * f1);
    for (int64_t l0 = 0; l0 < nc; l0 += TABLE_LANES) {
        const int64_t nl = nc - l0 < TABLE_LANES ? nc - l0 : TABLE_LANES;
        for (int64_t l = 0; l < nl; l++) s0[l] = s1[l] = s2[l] = 0.0f;
        for (int64_t n = 0; n < k1; n++) {
            const float *hc = h + 2 * n * ld + l0, *hs = hc + ld, *tc = tab + 2 * n * ld + l0, *ts = tc + ld;
            const float fn = (float)n, fn2 = (float)(n * n);
#pragma omp simd
            for (int64_t l = 0; l < nl; l++) {
                const float re = hc[l] * tc[l] - hs[l] * ts[l];
                const float im = hc[l] * ts[l] + hs[l] * tc[l];
                s0[l] += re;
                s1[l] += fn2 * re;
                s2[l] += fn * im;
            }
        }
        for (int64_t l = 0; l < nl; l++) {
            out[3 * (l0 + l)] = s0[l];
            out[3 * (l0 + l) + 1] = w1 * s1[l];
            out[3 * (l0 + l) + 2] = w2 * s2[l];
        }
    }
}

/* Fortran BLAS sgemm (column-major). Integers are passed as int64 holding small values, which an
 * LP64 library reads correctly through their low 32 bits (little-endian) and an ILP64 one whole. */
typedef void (*sgemm_fn)(const char *, const char *, const int64_t *, const int64_t *, const int64_t *,
                         const float *, const float *, const int64_t *, const float *, const int64_t *,
                         const float *, float *, const int64_t *);

static void sgemm_call(sgemm_fn f, char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
                       const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    const float one = 1.0f;
    f(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

/* 1 if sgemm_ptr multiplies correctly (a 2x3 by 3x2 product), else 0. */
GMM_EXPORT int gmm_sgemm_check(void *sgemm_ptr) {
    const float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, -1, 2, 1, 0}; /* column-major 2x3, 3x2 */
    float c[4] = {0, 0, 0, 0};
    sgemm_call((sgemm_fn)sgemm_ptr, 'N', 'N', 2, 2, 3, a, 2, b, 3, 0.0f, c, 2);
    return c[0] == -4.0f && c[1] == -4.0f && c[2] == 5.0f && c[3] == 8.0f;
}

/* Per thread: flushed subnormals (envelopes of wide Gaussians underflow, and subnormal arithmetic is
 * ~100x slower); the sgemm inside our parallel loop runs on its caller's thread (MKL and OpenBLAS do
 * not nest threads inside an OpenMP parallel region). Returns the state to restore. */
static unsigned int enter_thread(void) {
#if defined(__SSE__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* FTZ | DAZ */
    return csr;
#else
    return 0;
#endif
}

static void leave_thread(unsigned int csr) {
#if defined(__SSE__)
    _mm_setcsr(csr);
#else
    (void)csr;
#endif
}

/* Work space that persists per thread between calls: fresh allocations of this size are mmap'd
 * and page-faulted on every call (~0.2 ms of a 1 ms projection at small N). A slot grows to the
 * largest request and is kept; slots hold at most ~1 MB of tables per OpenMP worker plus the
 * caller's blocks (B (2 k1)^2 floats per thread and two per particle in the backward). */
static THREAD_LOCAL float *worker_slot = NULL, *caller_slot = NULL, *ratio_slot = NULL;
static THREAD_LOCAL size_t worker_size = 0, caller_size = 0, ratio_size = 0;

static float *thread_scratch(float **slot, size_t *size, size_t floats) {
    if (floats > *size) {
        free(*slot);
        *slot = malloc(sizeof(float) * floats);
        *size = *slot ? floats : 0;
    }
    return *slot;
}

/* The inputs of one projection (gmmrefine/gmm/project.py, _FusedProjection); a batch of 1
 * broadcasts to nb. */
typedef struct {
    const float *centers;  /* (bc, N, 3) A */
    const float *rows;     /* (br, 2, 3) the first two rows of each rotation A */
    const float *shift_px; /* (bs, 2) image translation (px), or NULL */
    const float *amp;      /* (ba, N) */
    const float *width;    /* (bw, N) A */
    const int64_t *gather; /* (4, np) indices of each pixel's cc, cs, sc, ss in the (2 k1)^2 blocks */
    const float *sign;     /* (np,) -1 where ky < 0 */
    int64_t bc, br, bs, ba, bw, nb, n, k1, np, chunk;
    double f1, apix, kappa; /* f1 = 1 / (D apix) (1/A); kappa = (2 pi)^{3/2} / apix^3 */
} projection_args;

/* Envelope ratios q = exp(-2 pi^2 s^2 f1^2), (bw, N) doubles, once per call (not per particle). */
static const double *envelope_ratios(const projection_args *a) {
    const int64_t count = a->bw * a->n;
    double *q = (double *)thread_scratch(&ratio_slot, &ratio_size, (size_t)(2 * count));
    if (q == NULL) return NULL;
    const double c = -2.0 * 3.14159265358979323846 * 3.14159265358979323846 * a->f1 * a->f1;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++) q[i] = exp(c * (double)a->width[i] * (double)a->width[i]);
    return q;
}

/* Tables of one (particle, chunk) work item. */
static void item_tables(const projection_args *a, const double *q, int64_t b, int64_t j0, int64_t nc, int scaled,
                        float *xt, float *yt) {
    const float *sh = a->shift_px ? a->shift_px + 2 * (a->bs > 1 ? b : 0) : NULL;
    const int64_t ia = (a->ba > 1 ? b : 0) * a->n + j0, iw = (a->bw > 1 ? b : 0) * a->n + j0;
    gmm_chunk_tables(a->centers + 3 * ((a->bc > 1 ? b : 0) * a->n + j0), a->rows + 6 * (a->br > 1 ? b : 0),
                     sh ? sh[0] * a->apix : 0.0, sh ? sh[1] * a->apix : 0.0, q + iw, scaled ? a->amp + ia : NULL,
                     a->width + iw, a->kappa, nc, a->k1, 2.0 * 3.14159265358979323846 * a->f1, xt, yt, nc);
}

/*
 * Forward: the blocks (2 k1, 2 k1) = sum_j ys[b, j, :]^T x[b, j, :] of each particle (tables of
 * project.py: x from p_x, ys = a * table of p_y), and from them the band pixels, interleaved
 * complex out (nb, np, 2): re = cc - sign ss, im = -(sign sc + cs). Work items are (particle, chunk)
 * pairs in static order; each thread sums into its own blocks, added in thread order (deterministic
 * for a given thread count). Returns 0, or -1 when out of memory.
 */
GMM_EXPORT int gmm_project_fused_forward(void *sgemm_ptr, const projection_args *a, float *out) {
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t nb = a->nb, n = a->n, np = a->np, chunk = a->chunk, row = 2 * a->k1, blk = row * row;
    const int64_t nch = (n + chunk - 1) / chunk, items = nb * nch;
    const int nthreads = omp_get_max_threads();
    const double *q = envelope_ratios(a);
    float *acc = thread_scratch(&caller_slot, &caller_size, (size_t)nthreads * nb * blk);
    char *touched = calloc((size_t)nthreads * nb, 1);
    int failed = q == NULL || acc == NULL || touched == NULL;
    if (!failed) {
        memset(acc, 0, sizeof(float) * (size_t)nthreads * nb * blk);
#pragma omp parallel num_threads(nthreads)
        {
            const int tid = omp_get_thread_num();
            const unsigned int csr = enter_thread();
            float *xt = thread_scratch(&worker_slot, &worker_size, (size_t)2 * row * chunk);
            float *yt = xt ? xt + row * chunk : NULL;
            if (!xt) failed = 1;
#pragma omp for schedule(static)
            for (int64_t item = 0; item < items; item++) {
                if (!xt) continue;
                const int64_t b = item / nch, j0 = (item % nch) * chunk, nc = n - j0 < chunk ? n - j0 : chunk;
                item_tables(a, q, b, j0, nc, 1, xt, yt);
                /* column-major: acc^T (row x row) = xt_cm^T (row x nc) * yt_cm (nc x row) */
                sgemm_call(sgemm, 'T', 'N', row, row, nc, xt, nc, yt, nc, 1.0f,
                           acc + ((int64_t)tid * nb + b) * blk, row);
                touched[tid * nb + b] = 1;
            }
            leave_thread(csr);
        }
    }
    if (!failed) {
        const int64_t *icc = a->gather, *ics = a->gather + np, *isc = a->gather + 2 * np, *iss = a->gather + 3 * np;
        const float *sign = a->sign;
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            float *o = NULL; /* the first thread's blocks of b collect the others' */
            for (int t = 0; t < nthreads; t++) {
                if (!touched[t * nb + b]) continue;
                float *part = acc + ((int64_t)t * nb + b) * blk;
                if (o == NULL) {
                    o = part;
                } else {
                    for (int64_t i = 0; i < blk; i++) o[i] += part[i];
                }
            }
            float *ob = out + 2 * b * np;
            for (int64_t p = 0; p < np; p++) {
                const float cc = o ? o[icc[p]] : 0.0f, cs = o ? o[ics[p]] : 0.0f;
                const float sc = o ? o[isc[p]] : 0.0f, ss = o ? o[iss[p]] : 0.0f;
                ob[2 * p] = cc - sign[p] * ss;
                ob[2 * p + 1] = -(sign[p] * sc + cs);
            }
        }
    }
    free(touched);
    return failed ? -1 : 0;
}

/*
 * Backward, from grad (nb, np, 2), the interleaved complex gradient of the pixels: the gradient
 * blocks G of each particle (the adjoint of the forward's gather), g_rows = G with its sin columns
 * negated and g_cols = G^T likewise, so that with the tables rebuilt per work item, h = y0 g_rows
 * and u = x0 g_cols (Gaussian-major, (nc, 2 k1)) are the conjugate table gradients over the
 * amplitude. Their sums over frequency with x0 and y0 (gmm_chunk_sums: rx, ry) give, per particle
 * and Gaussian, d p = -a (rx[2], ry[2]), d a = rx[0] and d s (through a and the envelope):
 *   d_centers (nb, N, 3) = rows^T d p;  d_amp (nb, N) = kappa s^3 d a;
 *   d_width (nb, N) = -4 pi^2 s a (rx[1] + ry[1]) + 3 kappa amp s^2 d a;
 *   d_rows (nb, 2, 3) = sum_j d p_j c_j^T;  d_shift (nb, 2) = apix sum_j d p_j  (px).
 * Sums over a particle's Gaussians are made per work item and added in item order.
 */
GMM_EXPORT int gmm_project_fused_backward(void *sgemm_ptr, const projection_args *a, const float *grad, float *d_centers,
                               float *d_amp, float *d_width, float *d_rows, float *d_shift) {
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t nb = a->nb, n = a->n, np = a->np, chunk = a->chunk, k1 = a->k1, row = 2 * k1, blk = row * row;
    const int64_t nch = (n + chunk - 1) / chunk, items = nb * nch;
    const double *q = envelope_ratios(a);
    float *g_rows = thread_scratch(&caller_slot, &caller_size, (size_t)nb * 2 * blk + (size_t)items * 8);
    if (q == NULL || g_rows == NULL) return -1;
    memset(g_rows, 0, sizeof(float) * (size_t)nb * 2 * blk);
    float *g_cols = g_rows + nb * blk, *partial = g_rows + 2 * nb * blk; /* (items, 8) */
    const float kappa = (float)a->kappa, four_pi2 = (float)(4.0 * 3.14159265358979323846 * 3.14159265358979323846);
    int failed = 0;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t *icc = a->gather, *ics = a->gather + np, *isc = a->gather + 2 * np, *iss = a->gather + 3 * np;
        const float *g = grad + 2 * b * np, *sign = a->sign;
        float *gb = g_rows + b * blk, *gc = g_cols + b * blk;
        for (int64_t p = 0; p < np; p++) {
            gb[icc[p]] += g[2 * p];
            gb[iss[p]] -= sign[p] * g[2 * p];
            gb[isc[p]] -= sign[p] * g[2 * p + 1];
            gb[ics[p]] -= g[2 * p + 1];
        }
        for (int64_t r = 0; r < row; r++) {
            for (int64_t c = 0; c < row; c++) {
                const float v = gb[r * row + c];
                gc[c * row + r] = r % 2 ? -v : v; /* sin rows of G, the columns of G^T */
            }
        }
        for (int64_t r = 0; r < row; r++) {
            for (int64_t c = 1; c < row; c += 2) gb[r * row + c] = -gb[r * row + c];
        }
    }
#pragma omp parallel
    {
        const unsigned int csr = enter_thread();
        float *xt = thread_scratch(&worker_slot, &worker_size, (size_t)4 * row * chunk + (size_t)6 * chunk);
        float *yt = xt ? xt + row * chunk : NULL, *ht = xt ? xt + 2 * row * chunk : NULL;
        float *ut = xt ? xt + 3 * row * chunk : NULL, *rx = xt ? xt + 4 * row * chunk : NULL;
        float *ry = rx ? rx + 3 * chunk : NULL;
        if (!xt) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (!xt) continue;
            const int64_t b = item / nch, j0 = (item % nch) * chunk, nc = n - j0 < chunk ? n - j0 : chunk;
            item_tables(a, q, b, j0, nc, 0, xt, yt);
            /* column-major: h (nc x row) = yt_cm (nc x row) * g_rows (stored row-major: 'T') */
            sgemm_call(sgemm, 'N', 'T', nc, row, row, yt, nc, g_rows + b * blk, row, 0.0f, ht, nc);
            sgemm_call(sgemm, 'N', 'T', nc, row, row, xt, nc, g_cols + b * blk, row, 0.0f, ut, nc);
            gmm_chunk_sums(ht, xt, nc, k1, nc, a->f1, rx);
            gmm_chunk_sums(ut, yt, nc, k1, nc, a->f1, ry);
            const float *c = a->centers + 3 * ((a->bc > 1 ? b : 0) * n + j0), *rw = a->rows + 6 * (a->br > 1 ? b : 0);
            const float *amp = a->amp + (a->ba > 1 ? b : 0) * n + j0, *width = a->width + (a->bw > 1 ? b : 0) * n + j0;
            float *dc = d_centers + 3 * (b * n + j0), *da = d_amp + b * n + j0, *dw = d_width + b * n + j0;
            float s00 = 0, s01 = 0, s02 = 0, s10 = 0, s11 = 0, s12 = 0, spx = 0, spy = 0;
            for (int64_t j = 0; j < nc; j++) {
                const float s = width[j], s2 = s * s, ascale = kappa * amp[j] * (s2 * s);
                const float dpx = -ascale * rx[3 * j + 2], dpy = -ascale * ry[3 * j + 2], d_ascale = rx[3 * j];
                dc[3 * j] = rw[0] * dpx + rw[3] * dpy;
                dc[3 * j + 1] = rw[1] * dpx + rw[4] * dpy;
                dc[3 * j + 2] = rw[2] * dpx + rw[5] * dpy;
                da[j] = d_ascale * kappa * (s2 * s);
                dw[j] = -four_pi2 * s * ascale * (rx[3 * j + 1] + ry[3 * j + 1]) + d_ascale * amp[j] * (3.0f * kappa) * s2;
                s00 += dpx * c[3 * j];
                s01 += dpx * c[3 * j + 1];
                s02 += dpx * c[3 * j + 2];
                s10 += dpy * c[3 * j];
                s11 += dpy * c[3 * j + 1];
                s12 += dpy * c[3 * j + 2];
                spx += dpx;
                spy += dpy;
            }
            float *pt = partial + 8 * item;
            pt[0] = s00, pt[1] = s01, pt[2] = s02, pt[3] = s10, pt[4] = s11, pt[5] = s12, pt[6] = spx, pt[7] = spy;
        }
        leave_thread(csr);
    }
    if (failed) return -1;
    for (int64_t b = 0; b < nb; b++) {
        double sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t ch = 0; ch < nch; ch++) {
            for (int k = 0; k < 8; k++) sums[k] += partial[8 * (b * nch + ch) + k];
        }
        for (int k = 0; k < 6; k++) d_rows[6 * b + k] = (float)sums[k];
        d_shift[2 * b] = (float)(sums[6] * a->apix);
        d_shift[2 * b + 1] = (float)(sums[7] * a->apix);
    }
    return 0;
}

/*
 * Elementwise steps of the Pipe-Menon iteration (gmmrefine/reconstruct/invert.py), one pass each
 * over the padded grid instead of 2-3 strided tensor passes and an index tensor per slab.
 */

/* spectrum (count complex, interleaved) = a * b + 0i */
GMM_EXPORT void gmm_pm_fill(float *spectrum, const float *a, const float *b, int64_t count) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++) {
        spectrum[2 * i] = a[i] * b[i];
        spectrum[2 * i + 1] = 0.0f;
    }
}

/* real[z][y][x] *= table[kz^2 + ky^2 + kx^2] on an n^3 grid with rows of stride n + 2 floats (the
 * real view of an in-place transform), k the signed frequency of each index (i or i - n). */
GMM_EXPORT void gmm_pm_multiply_radial(float *real, const float *table, int64_t n) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t z = 0; z < n; z++) {
        for (int64_t y = 0; y < n; y++) {
            const int64_t kz = z < n - z ? z : n - z, ky = y < n - y ? y : n - y;
            const int64_t r2 = kz * kz + ky * ky;
            float *rowp = real + (z * n + y) * (n + 2);
            for (int64_t x = 0; x < n; x++) {
                const int64_t kx = x < n - x ? x : n - x;
                rowp[x] *= table[r2 + kx * kx];
            }
        }
    }
}

/* inverse[i] = min(inverse[i] / max(|Re spectrum[i]|, floor), cap) */
GMM_EXPORT void gmm_pm_divide(float *inverse, const float *spectrum, int64_t count, float floor_value, float cap) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++) {
        float d = fabsf(spectrum[2 * i]);
        d = d > floor_value ? d : floor_value;
        float v = inverse[i] / d;
        inverse[i] = v < cap ? v : cap;
    }
}

/* Threads of the OpenMP loops (0: built without OpenMP, the loops run serially). */
GMM_EXPORT int gmm_openmp_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
}

/* An importable module too, so that packaging and import machinery can find the library. */
static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native", "gmmrefine's compiled CPU kernels (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
