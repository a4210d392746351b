// fingerprint: xh128, a fast non-cryptographic 128-bit hash of a byte stream, for model
// identity (is this the model the store recorded?), not security: anyone who can choose the
// bytes can forge a collision.
//
// The stream is the concatenation of the given buffers. Definition (pyunlearn/_reference.py
// holds a numpy twin that must give the same bits):
//   mix64(x)  = splitmix64's finaliser: x ^= x >> 30; x *= 0xbf58476d1ce4e5b9; x ^= x >> 27;
//               x *= 0x94d049bb133111eb; x ^= x >> 31 (all mod 2^64)
//   key(j)    = mix64((j + 1) · 0x9e3779b97f4a7c15)
//   stripe    = 64 bytes, read as 8 little-endian uint64 words w[0..7]; the stream's last
//               stripe is zero-padded
//   period    = 16 stripes; block = 1 MiB = 1024 periods; block b holds stream bytes
//               [b · 2^20, (b + 1) · 2^20) and starts with acc[l] = key(32 + l)
//   stripe s of a period, lane l: x = w[l] ^ key(s + l); acc[l] += lo32(x) · hi32(x);
//               acc[l ^ 1] += w[l]
//   after every period (a final partial one too): acc[l] = (acc[l] ^ acc[l] >> 47 ^ key(24 + l))
//               · 0x9e3779b1
//   blocks combine in order: h1 = key(40), h2 = key(41); per block, per lane l:
//               h1 = mix64(h1 ^ acc[l]); h2 = mix64((h2 ^ rotl(acc[l], 32)) + 0x9e3779b97f4a7c15)
//   digest    = a, b as big-endian bytes, a = mix64(h1 ^ N), b = mix64(h2 ^ a), N = stream bytes
// Blocks are hashed in parallel and combined in order: the digest does not depend on the
// thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace pyunlearn {

struct Digest128 {
    uint64_t a, b;  // the digest is a then b, each big-endian
};

Digest128 fingerprint_cpu(const std::vector<ByteRange>& parts, int threads);

// Streams of fewer 1 MiB blocks than this are hashed on the calling thread.
struct FingerprintTuning {
    int64_t serial_below_blocks;
    bool simd;  // off: the portable loops even where AVX-512 is present
};
FingerprintTuning fingerprint_tuning();
void set_fingerprint_tuning(const FingerprintTuning& tuning);

}  // namespace pyunlearn
