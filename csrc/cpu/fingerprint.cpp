// xh128 (see fingerprint.h for the definition): 1 MiB blocks hashed in parallel, each by eight
// 64-bit lanes that take one multiply and two adds per 8 bytes, so a core hashes at about the
// speed it reads memory.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <vector>

#include "../fingerprint.h"

namespace pyunlearn {
namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
constexpr uint64_t kScrambleFactor = 0x9e3779b1ull;
constexpr int kLanes = 8;
constexpr int64_t kStripe = 64;
constexpr int kPeriod = 16;                  // stripes between scrambles
constexpr int64_t kBlock = int64_t{1} << 20;  // bytes hashed as one task

std::atomic<int64_t> g_serial_below_blocks{4};
std::atomic<bool> g_simd{true};

constexpr uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

struct Keys {
    uint64_t v[48];
    constexpr Keys() : v() {
        for (int j = 0; j < 48; ++j) v[j] = mix64((static_cast<uint64_t>(j) + 1) * kGolden);
    }
};
constexpr Keys kKeys;
constexpr int kScrambleKey = 24, kInitKey = 32, kCombineKey = 40;

inline uint64_t load64(const unsigned char* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);  // little-endian on every target this builds for
    return w;
}

// The state of one block: eight lanes and the position within the current period.
struct Lanes {
    alignas(64) uint64_t acc[kLanes];
    int stripe = 0;
};

inline void scramble_portable(uint64_t* acc) {
    for (int l = 0; l < kLanes; ++l) acc[l] = (acc[l] ^ (acc[l] >> 47) ^ kKeys.v[kScrambleKey + l]) * kScrambleFactor;
}

// `n` whole stripes into the lanes, portable code.
PU_HOT void feed_portable(Lanes& st, const unsigned char* p, int64_t n) {
    uint64_t acc[kLanes];
    std::memcpy(acc, st.acc, sizeof acc);
    for (int64_t j = 0; j < n; ++j, p += kStripe) {
        const uint64_t* key = kKeys.v + st.stripe;
        for (int l = 0; l < kLanes; ++l) {
            const uint64_t w = load64(p + 8 * l), x = w ^ key[l];
            acc[l] += (x & 0xffffffffu) * (x >> 32);
            acc[l ^ 1] += w;
        }
        if (++st.stripe == kPeriod) {
            scramble_portable(acc);
            st.stripe = 0;
        }
    }
    std::memcpy(st.acc, acc, sizeof acc);
}

#if defined(__x86_64__)
// GCC 12 warns that intrinsics' internal _mm512_undefined_* values are uninitialised (a false
// positive, GCC bug 105593): silence that here only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define PU_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

PU_AVX512 inline __m512i stripe_avx512(__m512i acc, const unsigned char* p, const uint64_t* key) {
    const __m512i w = _mm512_loadu_si512(p);
    const __m512i x = _mm512_xor_si512(w, _mm512_loadu_si512(key));
    acc = _mm512_add_epi64(acc, _mm512_mul_epu32(x, _mm512_srli_epi64(x, 32)));
    return _mm512_add_epi64(acc, _mm512_shuffle_epi32(w, _MM_PERM_BADC));  // lane l ^ 1 gets w[l]
}

PU_AVX512 inline __m512i scramble_avx512(__m512i acc) {
    const __m512i k = _mm512_loadu_si512(kKeys.v + kScrambleKey);
    acc = _mm512_xor_si512(_mm512_xor_si512(acc, _mm512_srli_epi64(acc, 47)), k);
    return _mm512_mullo_epi64(acc, _mm512_set1_epi64(static_cast<long long>(kScrambleFactor)));
}

// The same in one register: a whole period at a time where the stream allows.
PU_AVX512 void feed_avx512(Lanes& st, const unsigned char* p, int64_t n) {
    __m512i acc = _mm512_load_si512(st.acc);
    while (n > 0) {
        if (st.stripe == 0 && n >= kPeriod) {
            for (; n >= kPeriod; n -= kPeriod, p += kPeriod * kStripe) {
#pragma GCC unroll 16
                for (int s = 0; s < kPeriod; ++s) acc = stripe_avx512(acc, p + s * kStripe, kKeys.v + s);
                acc = scramble_avx512(acc);
            }
            continue;
        }
        acc = stripe_avx512(acc, p, kKeys.v + st.stripe);
        p += kStripe;
        --n;
        if (++st.stripe == kPeriod) {
            acc = scramble_avx512(acc);
            st.stripe = 0;
        }
    }
    _mm512_store_si512(st.acc, acc);
}

bool have_avx512() {
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    return yes;
}
#pragma GCC diagnostic pop
#else
bool have_avx512() { return false; }
#endif

void feed(bool avx512, Lanes& st, const unsigned char* p, int64_t n) {
#if defined(__x86_64__)
    if (avx512) return feed_avx512(st, p, n);
#endif
    feed_portable(st, p, n);
}

// The lanes of the block holding stream bytes [lo, hi) (hi − lo a multiple of 64 except at the
// stream's end). `starts[i]` is where part i begins in the stream.
std::array<uint64_t, kLanes> hash_block(bool avx512, const std::vector<ByteRange>& parts,
                                        const std::vector<int64_t>& starts, int64_t lo, int64_t hi) {
    Lanes st;
    for (int l = 0; l < kLanes; ++l) st.acc[l] = kKeys.v[kInitKey + l];
    unsigned char carry[kStripe];  // a stripe that spans two parts
    int64_t carried = 0;
    size_t i = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
    for (int64_t pos = lo; pos < hi;) {
        const int64_t part_end = starts[i] + parts[i].bytes;
        const unsigned char* src = static_cast<const unsigned char*>(parts[i].data) + (pos - starts[i]);
        int64_t avail = std::min(part_end, hi) - pos;
        pos += avail;
        if (carried > 0) {
            const int64_t take = std::min(kStripe - carried, avail);
            std::memcpy(carry + carried, src, take);
            carried += take;
            src += take;
            avail -= take;
            if (carried == kStripe) {
                feed(avx512, st, carry, 1);
                carried = 0;
            }
        }
        const int64_t whole = avail / kStripe;
        feed(avx512, st, src, whole);
        if (avail % kStripe) {
            carried = avail % kStripe;
            std::memcpy(carry, src + whole * kStripe, carried);
        }
        if (pos >= part_end) ++i;
    }
    if (carried > 0) {  // the stream's last stripe, zero-padded
        std::memset(carry + carried, 0, kStripe - carried);
        feed(avx512, st, carry, 1);
    }
    if (st.stripe != 0) scramble_portable(st.acc);
    std::array<uint64_t, kLanes> out;
    std::memcpy(out.data(), st.acc, sizeof st.acc);
    return out;
}

inline uint64_t rotl32(uint64_t x) { return (x << 32) | (x >> 32); }

}  // namespace

FingerprintTuning fingerprint_tuning() { return {g_serial_below_blocks.load(), g_simd.load()}; }
void set_fingerprint_tuning(const FingerprintTuning& tuning) {
    g_serial_below_blocks.store(tuning.serial_below_blocks);
    g_simd.store(tuning.simd);
}

Digest128 fingerprint_cpu(const std::vector<ByteRange>& parts, int threads) {
    std::vector<int64_t> starts(parts.size());
    int64_t total = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
        starts[i] = total;
        total += parts[i].bytes;
    }
    const int64_t blocks = (total + kBlock - 1) / kBlock;
    const bool avx512 = g_simd.load() && have_avx512();
    const int T = threads <= 0 && blocks < g_serial_below_blocks.load() ? 1 : resolve_threads(threads);
    std::vector<std::array<uint64_t, kLanes>> lanes(blocks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(T) if (T > 1)
    for (int64_t b = 0; b < blocks; ++b)
        lanes[b] = hash_block(avx512, parts, starts, b * kBlock, std::min(total, (b + 1) * kBlock));

    uint64_t h1 = kKeys.v[kCombineKey], h2 = kKeys.v[kCombineKey + 1];
    for (const auto& acc : lanes)
        for (uint64_t x : acc) {
            h1 = mix64(h1 ^ x);
            h2 = mix64((h2 ^ rotl32(x)) + kGolden);
        }
    const uint64_t a = mix64(h1 ^ static_cast<uint64_t>(total));
    return {a, mix64(h2 ^ a)};
}

}  // namespace pyunlearn
