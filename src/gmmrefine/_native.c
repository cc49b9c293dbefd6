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
int gmm_insert_slices(float *data, float *weight, const float *values, const float *wts,
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

/* e^{i n t} for n = 0..k1-1 by doubling: entries L..2L-1 are entries 0..L-1 times e^{i L t}, a
 * vectorisable loop; one cos and sin per call, error ~log2(n) roundings of double precision. */
static void phasors(double t, int64_t k1, double *re, double *im) {
    re[0] = 1.0;
    im[0] = 0.0;
    if (k1 > 1) sincos(t, &im[1], &re[1]);
    for (int64_t len = 2; len < k1; len *= 2) {
        const double hr = re[len / 2], hi = im[len / 2];
        const double sr = hr * hr - hi * hi, si = 2.0 * hr * hi; /* e^{i L t} = (e^{i L/2 t})^2 */
        const int64_t count = len < k1 - len ? len : k1 - len;
#pragma omp simd
        for (int64_t m = 0; m < count; m++) {
            re[len + m] = re[m] * sr - im[m] * si;
            im[len + m] = re[m] * si + im[m] * sr;
        }
    }
}

/*
 * Tables of the separable GMM projection (gmmrefine/gmm/project.py) in one pass instead of ~4
 * tensor passes: for particle b, Gaussian j and n = 0..k1-1, with t = 2 pi f1 p and the envelope
 * g_n = exp(-2 pi^2 s^2 f1^2 n^2),
 *   x0[b, j, 2n] = g_n cos(n t_x), x0[b, j, 2n + 1] = g_n sin(n t_x)   (y0 likewise with p_y)
 *   ys[b, j, :]  = y0[b, j, :] * ascale[b, j]
 * computed in double precision and stored as float32. The envelope of a Gaussian is computed once
 * for every particle that shares its width. ys may be a reused buffer (it is not saved for backward).
 *
 * pos: (bp, N, 2) x, y in A; width: (bw, N) A; ascale: (ba, N); the tables have batch tb = max(bp,
 * bw) and ys has max(tb, ba) (a batch of 1 broadcasts). Gaussians c0 <= j < c0 + nc are written at
 * j - c0. Threads: OpenMP over Gaussians, in the runtime torch uses (libgomp is loaded by torch
 * before this library, so the two share one thread pool and its thread count).
 */
void gmm_projection_tables(const float *pos, const float *width, const float *ascale, int64_t bp,
                           int64_t bw, int64_t ba, int64_t n, int64_t c0, int64_t nc, int64_t k1,
                           double f1, float *x0, float *y0, float *ys) {
    const int64_t tb = bp > bw ? bp : bw, yb = tb > ba ? tb : ba, row = 2 * k1;
    const double two_pi_f1 = 2.0 * 3.14159265358979323846 * f1;
    const double c = -2.0 * 3.14159265358979323846 * 3.14159265358979323846 * f1 * f1;
#pragma omp parallel
    {
        double *buf = malloc(sizeof(double) * 5 * (size_t)k1);
        double *xr = buf, *xi = buf + k1, *yr = buf + 2 * k1, *yi = buf + 3 * k1, *g = buf + 4 * k1;
#pragma omp for schedule(static)
        for (int64_t jc = 0; jc < nc; jc++) {
            const int64_t j = c0 + jc;
            for (int64_t b = 0; b < yb; b++) {
                const int64_t bt = tb > 1 ? b : 0;
                if (b == 0 || bw > 1) {
                    /* g_k = q^{k^2}: g_{k+1} = g_k r_k with r_k = q^{2k+1}, r_{k+1} = r_k q^2 (one exp) */
                    const double s = width[(bw > 1 ? bt : 0) * n + j];
                    const double q = exp(c * s * s), q2 = q * q;
                    double gk = 1.0, rk = q;
                    for (int64_t k = 0; k < k1; k++) {
                        g[k] = gk;
                        gk *= rk;
                        rk *= q2;
                    }
                }
                if (b == 0 || tb > 1) {
                    const float *p = pos + 2 * ((bp > 1 ? bt : 0) * n + j);
                    phasors(two_pi_f1 * p[0], k1, xr, xi);
                    phasors(two_pi_f1 * p[1], k1, yr, yi);
                }
                const float a = ascale[(ba > 1 ? b : 0) * n + j];
                float *oy = ys + (b * nc + jc) * row;
                if (b < tb) {
                    float *ox = x0 + (bt * nc + jc) * row, *o = y0 + (bt * nc + jc) * row;
#pragma omp simd
                    for (int64_t k = 0; k < k1; k++) {
                        ox[2 * k] = (float)(g[k] * xr[k]);
                        ox[2 * k + 1] = (float)(g[k] * xi[k]);
                        o[2 * k] = (float)(g[k] * yr[k]);
                        o[2 * k + 1] = (float)(g[k] * yi[k]);
                    }
                }
#pragma omp simd
                for (int64_t k = 0; k < k1; k++) {
                    oy[2 * k] = (float)(g[k] * yr[k]) * a;
                    oy[2 * k + 1] = (float)(g[k] * yi[k]) * a;
                }
            }
        }
        free(buf);
    }
}

/*
 * Sums over frequency of the backward of the separable projection: with z_n = h_n * tab_n (complex
 * products of a table gradient's conjugate and the table, both interleaved re, im),
 *   out[b, j] = (sum_n Re z_n, f1^2 sum_n n^2 Re z_n, 2 pi f1 sum_n n Im z_n)
 * h: (B, nc, 2 k1); tab: (tb, nc, 2 k1) with tb = 1 or B; out: (B, nc, 3).
 */
void gmm_projection_table_sums(const float *h, const float *tab, int64_t nb, int64_t tb, int64_t nc,
                               int64_t k1, double f1, float *out) {
    const int64_t row = 2 * k1;
    const float w1 = (float)(f1 * f1), w2 = (float)(2.0 * 3.14159265358979323846 * f1);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t j = 0; j < nc; j++) {
            const float *hr = h + (b * nc + j) * row, *tr = tab + ((tb > 1 ? b : 0) * nc + j) * row;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2)
            for (int64_t k = 0; k < k1; k++) {
                const float re = hr[2 * k] * tr[2 * k] - hr[2 * k + 1] * tr[2 * k + 1];
                const float im = hr[2 * k] * tr[2 * k + 1] + hr[2 * k + 1] * tr[2 * k];
                const float fk = (float)k;
                s0 += re;
                s1 += fk * fk * re;
                s2 += fk * im;
            }
            float *o = out + 3 * (b * nc + j);
            o[0] = s0;
            o[1] = w1 * s1;
            o[2] = w2 * s2;
        }
    }
}

/*
 * Elementwise steps of the Pipe-Menon iteration (gmmrefine/reconstruct/invert.py), one pass each
 * over the padded grid instead of 2-3 strided tensor passes and an index tensor per slab.
 */

/* spectrum (count complex, interleaved) = a * b + 0i */
void gmm_pm_fill(float *spectrum, const float *a, const float *b, int64_t count) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++) {
        spectrum[2 * i] = a[i] * b[i];
        spectrum[2 * i + 1] = 0.0f;
    }
}

/* real[z][y][x] *= table[kz^2 + ky^2 + kx^2] on an n^3 grid with rows of stride n + 2 floats (the
 * real view of an in-place transform), k the signed frequency of each index (i or i - n). */
void gmm_pm_multiply_radial(float *real, const float *table, int64_t n) {
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
void gmm_pm_divide(float *inverse, const float *spectrum, int64_t count, float floor_value, float cap) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++) {
        float d = fabsf(spectrum[2 * i]);
        d = d > floor_value ? d : floor_value;
        float v = inverse[i] / d;
        inverse[i] = v < cap ? v : cap;
    }
}

/* An importable module too, so that packaging and import machinery can find the library. */
static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native", "gmmrefine's compiled CPU kernels (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
