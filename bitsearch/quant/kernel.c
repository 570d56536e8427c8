/* Fused unpack-and-multiply kernels for bitsearch's packed rows (CPU).
 *
 * One call handles one width slice of a layer: ``rows`` rows of ``K`` b-bit codes (b = 2..8),
 * each row a little-endian bit stream of ``row_bytes`` bytes (the layout of quant/packing.py),
 * with float16 scales and uint8 zeros per group of ``G`` codes (``ng`` groups per row).
 * ``out_index[r]`` is the output position of slice row r, so the rows of every width are
 * written straight to their channel positions (no permutation pass afterwards).
 *
 *   bs_gemv        y[i, out_index[r]] = sum_k x[i, k] * (q[r, k] - zero[r, g]) * scale[r, g]
 *   bs_gemv_f16    the same for rows kept in float16
 *   bs_gemv_layer  every slice of a layer (``bs_slice`` array) in one call
 *   bs_dequant     w[out_index[r], k] = (q[r, k] - zero[r, g]) * scale[r, g]   (float32)
 *
 * Eight codes of b bits fill exactly b bytes, so a block of 8 codes starts on a byte. With AVX2
 * a block is unpacked by one byte shuffle (two bytes per code into a 32-bit lane), one variable
 * shift and one mask; without AVX2 (or when groups do not hold whole blocks) a scalar path
 * reads each code from its two bytes. The integer code minus the zero is converted to float,
 * so dequantized values are bit-identical to quant/grid.py's dequantize.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(BS_SCALAR)
#include <immintrin.h>
#define BS_AVX2 1
#else
#define BS_AVX2 0
#endif

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {                       /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int code_at(const uint8_t *row, int64_t row_bytes, int bits, int64_t k) {
    int64_t pos = k * bits, byte = pos >> 3;
    uint32_t v = row[byte];
    if (byte + 1 < row_bytes) v |= (uint32_t)row[byte + 1] << 8;
    return (int)((v >> (pos & 7)) & ((1u << bits) - 1u));
}

int bs_has_avx2(void) { return BS_AVX2; }

#if BS_AVX2
typedef struct { __m256i shuffle, shifts, mask; } unpacker;

static unpacker make_unpacker(int bits) {
    int8_t shuf[32];
    int32_t sh[8];
    for (int j = 0; j < 8; j++) {
        int pos = j * bits, byte = pos >> 3;
        for (int half = 0; half < 2; half++) {   /* both 128-bit lanes see the same 16 bytes */
            int8_t *s = shuf + half * 16 + (j & 3) * 4;
            if ((j >> 2) != half) continue;
            s[0] = (int8_t)byte; s[1] = (int8_t)(byte + 1); s[2] = (int8_t)0x80; s[3] = (int8_t)0x80;
        }
        sh[j] = pos & 7;
    }
    unpacker u;
    u.shuffle = _mm256_loadu_si256((const __m256i *)shuf);
    u.shifts = _mm256_loadu_si256((const __m256i *)sh);
    u.mask = _mm256_set1_epi32((1 << bits) - 1);
    return u;
}

/* 8 codes starting at p (16 bytes are read: the caller guarantees they exist) as int32 lanes */
static inline __m256i unpack8(const uint8_t *p, const unpacker *u) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, u->shuffle), u->shifts), u->mask);
}

/* Rows are read 16 bytes at a time, which may run past the end of the buffer for the last rows
 * (several when rows are shorter than 16 bytes): those are read from a zero-padded copy. */
typedef struct { const uint8_t *codes; int64_t row_bytes, first_copied; uint8_t *copy; } row_reader;

static int open_rows(row_reader *rd, const uint8_t *codes, int64_t rows, int64_t row_bytes) {
    int64_t tail = row_bytes > 0 ? 16 / row_bytes + 1 : rows;
    if (tail > rows) tail = rows;
    rd->codes = codes;
    rd->row_bytes = row_bytes;
    rd->first_copied = rows - tail;
    rd->copy = (uint8_t *)calloc((size_t)(tail * row_bytes + 16), 1);
    if (rd->copy == NULL) return 0;
    if (tail > 0) memcpy(rd->copy, codes + rd->first_copied * row_bytes, (size_t)(tail * row_bytes));
    return 1;
}

static inline const uint8_t *row_at(const row_reader *rd, int64_t r) {
    return r < rd->first_copied ? rd->codes + r * rd->row_bytes : rd->copy + (r - rd->first_copied) * rd->row_bytes;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

void bs_gemv(int bits, int64_t rows, int64_t K, int64_t G, int64_t ng, const uint8_t *codes, int64_t row_bytes,
             const uint16_t *scales, const uint8_t *zeros, const int32_t *out_index,
             const float *x, int64_t n, float *y, int64_t y_stride) {
#if BS_AVX2
    row_reader rd;
    const int vector = (G % 8 == 0) && (K % 8 == 0) && open_rows(&rd, codes, rows, row_bytes);
    const unpacker u = make_unpacker(bits);
#endif
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * K;
        float *yi = y + i * y_stride;
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *row = codes + r * row_bytes;
#if BS_AVX2
            const uint8_t *vrow = vector ? row_at(&rd, r) : row;
#endif
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
                int zero = zeros[r * ng + g];
                float part = 0.0f;
#if BS_AVX2
                if (vector) {
                    __m256i z = _mm256_set1_epi32(zero);
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    int64_t k = k0;
                    for (; k + 16 <= k1; k += 16) {
                        __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(unpack8(vrow + (k >> 3) * bits, &u), z));
                        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xi + k), a0);
                        __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(unpack8(vrow + ((k >> 3) + 1) * bits, &u), z));
                        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xi + k + 8), a1);
                    }
                    for (; k < k1; k += 8) {
                        __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(unpack8(vrow + (k >> 3) * bits, &u), z));
                        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xi + k), a0);
                    }
                    part = hsum(_mm256_add_ps(a0, a1));
                } else
#endif
                {
                    for (int64_t k = k0; k < k1; k++)
                        part += xi[k] * (float)(code_at(row, row_bytes, bits, k) - zero);
                }
                acc += part * half_to_float(scales[r * ng + g]);
            }
            yi[out_index[r]] = acc;
        }
    }
#if BS_AVX2
    if (vector) free(rd.copy);
#endif
}

void bs_gemv_f16(int64_t rows, int64_t K, const uint16_t *w, const int32_t *out_index,
                 const float *x, int64_t n, float *y, int64_t y_stride) {
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * K;
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *row = w + r * K;
            float acc = 0.0f;
            int64_t k = 0;
#if BS_AVX2
            __m256 a = _mm256_setzero_ps();
            for (; k + 8 <= K; k += 8)
                a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + k))),
                                    _mm256_loadu_ps(xi + k), a);
            acc = hsum(a);
#endif
            for (; k < K; k++) acc += xi[k] * half_to_float(row[k]);
            y[i * y_stride + out_index[r]] = acc;
        }
    }
}

void bs_dequant(int bits, int64_t rows, int64_t K, int64_t G, int64_t ng, const uint8_t *codes, int64_t row_bytes,
                const uint16_t *scales, const uint8_t *zeros, const int32_t *out_index, float *w) {
#if BS_AVX2
    row_reader rd;
    const int vector = (G % 8 == 0) && (K % 8 == 0) && open_rows(&rd, codes, rows, row_bytes);
    const unpacker u = make_unpacker(bits);
#endif
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = codes + r * row_bytes;
#if BS_AVX2
        const uint8_t *vrow = vector ? row_at(&rd, r) : row;
#endif
        float *out = w + (int64_t)out_index[r] * K;
        for (int64_t g = 0; g < ng; g++) {
            int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
            int zero = zeros[r * ng + g];
            float scale = half_to_float(scales[r * ng + g]);
#if BS_AVX2
            if (vector) {
                __m256i z = _mm256_set1_epi32(zero);
                __m256 s = _mm256_set1_ps(scale);
                for (int64_t k = k0; k < k1; k += 8) {
                    __m256i q = _mm256_sub_epi32(unpack8(vrow + (k >> 3) * bits, &u), z);
                    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
                }
                continue;
            }
#endif
            for (int64_t k = k0; k < k1; k++)
                out[k] = (float)(code_at(row, row_bytes, bits, k) - zero) * scale;
        }
    }
#if BS_AVX2
    if (vector) free(rd.copy);
#endif
}

/* One width slice of a layer: bits 2..8 (packed codes) or 16 (``codes`` holds float16 rows). */
typedef struct {
    int64_t bits, rows, K, G, ng, row_bytes;
    const uint8_t *codes;
    const uint16_t *scales;
    const uint8_t *zeros;
    const int32_t *out_index;
} bs_slice;

void bs_gemv_layer(const bs_slice *slices, int64_t n_slices, const float *x, int64_t n, float *y, int64_t y_stride) {
    for (int64_t s = 0; s < n_slices; s++) {
        const bs_slice *c = slices + s;
        if (c->bits == 16)
            bs_gemv_f16(c->rows, c->K, (const uint16_t *)c->codes, c->out_index, x, n, y, y_stride);
        else
            bs_gemv((int)c->bits, c->rows, c->K, c->G, c->ng, c->codes, c->row_bytes, c->scales, c->zeros,
                    c->out_index, x, n, y, y_stride);
    }
}
