/* Keyed HMAC-SHA256 pseudonyms of a column of strings, in one pass (RFC 2104, FIPS 180-4).

   The pseudonym of a value is the first 16 bytes of HMAC-SHA256(key, value), as 32
   lowercase hex digits: what etl/pseudonym.py's SQL macro computes. Here the SHA-256
   states after the key's inner and outer pads are computed once per call, so each value
   costs its own blocks and one block more, with no intermediate hex text. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_SHA_NI 1
#endif

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};
static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress_portable(uint32_t h[8], const uint8_t block[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | (uint32_t)block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}


#ifdef HAVE_SHA_NI
/* The same compression with the CPU's SHA extensions (Intel SHA-NI, on x86-64 CPUs since
   about 2017), used when the CPU has them: several times faster. */
__attribute__((target("sha,sse4.1"))) static void compress_ni(uint32_t h[8],
                                                             const uint8_t block[64]) {
    const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_loadu_si128((const __m128i *)&h[0]);
    __m128i state1 = _mm_loadu_si128((const __m128i *)&h[4]);
    tmp = _mm_shuffle_epi32(tmp, 0xB1);          /* CDAB */
    state1 = _mm_shuffle_epi32(state1, 0x1B);    /* EFGH */
    __m128i state0 = _mm_alignr_epi8(tmp, state1, 8); /* ABEF */
    state1 = _mm_blend_epi16(state1, tmp, 0xF0); /* CDGH */
    const __m128i abef = state0, cdgh = state1;
    __m128i m[4];
    for (int i = 0; i < 4; i++)
        m[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(block + 16 * i)), mask);
    for (int g = 0; g < 16; g++) {
        __m128i cur = m[g & 3];
        __m128i msg = _mm_add_epi32(cur, _mm_loadu_si128((const __m128i *)&K[4 * g]));
        state1 = _mm_sha256rnds2_epu32(state1, state0, msg);
        if (g >= 3 && g <= 14) {
            __m128i t = _mm_alignr_epi8(cur, m[(g - 1) & 3], 4);
            m[(g + 1) & 3] = _mm_sha256msg2_epu32(_mm_add_epi32(m[(g + 1) & 3], t), cur);
        }
        msg = _mm_shuffle_epi32(msg, 0x0E);
        state0 = _mm_sha256rnds2_epu32(state0, state1, msg);
        if (g >= 1 && g <= 12) m[(g - 1) & 3] = _mm_sha256msg1_epu32(m[(g - 1) & 3], cur);
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);
    tmp = _mm_shuffle_epi32(state0, 0x1B);        /* FEBA */
    state1 = _mm_shuffle_epi32(state1, 0xB1);     /* DCHG */
    state0 = _mm_blend_epi16(tmp, state1, 0xF0);  /* DCBA */
    state1 = _mm_alignr_epi8(state1, tmp, 8);     /* ABEF */
    _mm_storeu_si128((__m128i *)&h[0], state0);
    _mm_storeu_si128((__m128i *)&h[4], state1);
}
#endif

static void (*compress)(uint32_t h[8], const uint8_t block[64]) = compress_portable;

/* The state after one 64-byte block of pad bytes: the key (already at most 64 bytes) xor `pad`. */
static void pad_state(uint32_t h[8], const uint8_t *key, size_t len, uint8_t pad) {
    uint8_t block[64];
    memset(block, pad, 64);
    for (size_t i = 0; i < len; i++) block[i] = key[i] ^ pad;
    memcpy(h, H0, sizeof H0);
    compress(h, block);
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* Continue `start` (`done` bytes already hashed: 0 or a pad's 64) over msg and finish;
   the digest into out[32]. */
static void finish(const uint32_t start[8], size_t done, const uint8_t *msg, size_t len,
                   uint8_t out[32]) {
    uint32_t h[8];
    memcpy(h, start, sizeof h);
    size_t i = 0;
    for (; i + 64 <= len; i += 64) compress(h, msg + i);
    uint8_t block[128];
    size_t rest = len - i;
    memcpy(block, msg + i, rest);
    block[rest] = 0x80;
    size_t total = rest + 9 <= 64 ? 64 : 128;
    memset(block + rest + 1, 0, total - rest - 1);
    uint64_t bits = (uint64_t)(done + len) * 8;
    for (int b = 0; b < 8; b++) block[total - 1 - b] = (uint8_t)(bits >> (8 * b));
    compress(h, block);
    if (total == 128) compress(h, block + 64);
    for (int b = 0; b < 8; b++) put_be32(out + 4 * b, h[b]);
}

static const char HEX[] = "0123456789abcdef";

/* pseudonyms(key, offsets, data, first, n, wide) -> bytes of n * 32 hex digits.
   offsets: the Arrow offsets buffer (int32, or int64 when wide), data: the values' bytes;
   value j is data[offsets[first + j] : offsets[first + j + 1]]. */
static PyObject *pseudonyms(PyObject *self, PyObject *args) {
    Py_buffer key, offsets, data;
    Py_ssize_t first, n;
    int wide;
    if (!PyArg_ParseTuple(args, "y*y*y*nnp", &key, &offsets, &data, &first, &n, &wide))
        return NULL;
    PyObject *result = NULL;
    size_t width = wide ? 8 : 4;
    if (first < 0 || n < 0 || (size_t)offsets.len < (size_t)(first + n + 1) * width) {
        PyErr_SetString(PyExc_ValueError, "offsets buffer too short");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, n * 32);
    if (result == NULL) goto done;
    char *out = PyBytes_AS_STRING(result);
    const uint8_t *bytes = data.buf;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    uint8_t k[32];
    const uint8_t *kp = key.buf;
    size_t klen = (size_t)key.len;
    if (klen > 64) { /* RFC 2104: a longer key is hashed first */
        finish(H0, 0, kp, klen, k);
        kp = k;
        klen = 32;
    }
    uint32_t inner[8], outer[8];
    pad_state(inner, kp, klen, 0x36);
    pad_state(outer, kp, klen, 0x5c);
    for (Py_ssize_t j = 0; j < n; j++) {
        int64_t lo, hi;
        if (wide) {
            lo = ((const int64_t *)offsets.buf)[first + j];
            hi = ((const int64_t *)offsets.buf)[first + j + 1];
        } else {
            lo = ((const int32_t *)offsets.buf)[first + j];
            hi = ((const int32_t *)offsets.buf)[first + j + 1];
        }
        if (lo < 0 || hi < lo || hi > data.len) { bad = 1; break; }
        uint8_t digest[32];
        finish(inner, 64, bytes + lo, (size_t)(hi - lo), digest);
        finish(outer, 64, digest, 32, digest);
        for (int b = 0; b < 16; b++) {
            out[32 * j + 2 * b] = HEX[digest[b] >> 4];
            out[32 * j + 2 * b + 1] = HEX[digest[b] & 15];
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "an offset lies outside the data buffer");
    }
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    return result;
}

/* use_portable(flag): compute with the portable C compression even where the CPU has SHA
   extensions (tests compare the two); returns the implementation now in use. */
static PyObject *use_portable(PyObject *self, PyObject *args) {
    int portable;
    if (!PyArg_ParseTuple(args, "p", &portable)) return NULL;
    compress = compress_portable;
#ifdef HAVE_SHA_NI
    if (!portable && __builtin_cpu_supports("sha")) compress = compress_ni;
#endif
    return PyUnicode_FromString(compress == compress_portable ? "portable" : "sha-ni");
}

static PyMethodDef METHODS[] = {
    {"use_portable", use_portable, METH_VARARGS,
     "use_portable(flag) -> the implementation now in use ('portable' or 'sha-ni')"},
    {"pseudonyms", pseudonyms, METH_VARARGS,
     "pseudonyms(key, offsets, data, first, n, wide) -> n * 32 hex digits of HMAC-SHA256"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_hmac", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__hmac(void) {
#ifdef HAVE_SHA_NI
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sha")) compress = compress_ni;
#endif
    PyObject *module = PyModule_Create(&MODULE);
    if (module != NULL &&
        PyModule_AddStringConstant(module, "IMPLEMENTATION",
                                   compress == compress_portable ? "portable" : "sha-ni") < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
