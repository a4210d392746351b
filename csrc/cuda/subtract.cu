// subtract_sparse on the GPU, bit-identical to csrc/cpu/subtract.cpp.
//
// The CPU kernel applies the rows to each parameter in a canonical order (rows sorted by their
// bytes) with param −= alpha · (value · scale), rounding after each operation. Here:
//   rank     the canonical order, by comparing every pair of rows (a warp per pair, stopping at
//            the first differing word; equal rows keep their given order, which cannot matter).
//   chunk    per chunk of 2048 entries of one row's layer segment: the sum of its gaps and the
//            first zero gap.
//   segment  per (row, layer): chunk starts (a scan), and the check the CPU makes: a zero gap or
//            an index past the layer's end, reported for the lowest (row, layer) with the CPU's
//            reason. The host reads the verdict (the one synchronization) and stops there if a
//            row is bad: nothing has been written.
//   cursor   per (row, layer, tile of 8192 parameters): the first entry at or past the tile and
//            the position decoded before it.
//   apply    a block per tile: the tile in shared memory, then every row in canonical order,
//            each row's entries of the tile decoded (a scan of gaps) and applied in parallel
//            (a row's indices are distinct), a barrier between rows. Every parameter thus
//            gets the same operations in the same order as on the CPU.
#include <algorithm>
#include <cstring>
#include <vector>

#include "device.cuh"
#include "kernels.h"

namespace pyunlearn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunkItems = 8;
constexpr unsigned kChunk = kThreads * kChunkItems;  // entries per chunk
constexpr unsigned kTileParams = 8192;                // parameters per apply tile: 32 KB
constexpr unsigned kStage = 1024;                     // entries staged at a time: 8 KB
constexpr unsigned kStageItems = kStage / kThreads;
constexpr unsigned kRowGroup = 256;                   // rows whose cursors a tile holds at a time

const char* const kRepeats = "repeats an index (a zero gap)";
const char* const kPastEnd = "decodes to an index past the layer's end";

struct Seg {
    float* param;
    unsigned long long numel, k;
    unsigned long long offset;  // first entry of the layer in a row
    unsigned tiles;             // apply tiles (0 when k is 0: nothing to apply)
    unsigned cursor_begin;      // first cursor slot of the layer in a row (tiles + 1 slots)
};

struct Cursor {
    unsigned entry;  // first entry at or past the tile
    unsigned prev1;  // 1 + the position decoded just before it (0 at the segment's start)
};

// A row's bytes compare like memcmp: the first differing unit decides, read as big-endian.
__device__ __forceinline__ uint32_t big_endian(uint32_t x) { return __byte_perm(x, 0u, 0x0123u); }
__device__ __forceinline__ uint32_t big_endian(uint16_t x) { return (static_cast<uint32_t>(x & 0xffu) << 8) | (x >> 8); }

template <class U>
__device__ int compare_units(const U* a, const U* b, unsigned long long len) {  // a whole warp
    for (unsigned long long base = 0; base < len; base += 32) {
        const unsigned long long j = base + lane_id();
        const U x = j < len ? a[j] : U(0), y = j < len ? b[j] : U(0);
        const unsigned differ = __ballot_sync(kFullMask, x != y);
        if (differ != 0) {
            const int lane = __ffs(static_cast<int>(differ)) - 1;
            const uint32_t bx = __shfl_sync(kFullMask, big_endian(x), lane);
            const uint32_t by = __shfl_sync(kFullMask, big_endian(y), lane);
            return bx < by ? -1 : 1;
        }
    }
    return 0;
}

__global__ void __launch_bounds__(kThreads)
rank_kernel(const uint32_t* index, const void* values, int width, const float* scales, unsigned long long rows,
            unsigned long long row_len, int L, unsigned* rank) {
    const unsigned long long warps = static_cast<unsigned long long>(gridDim.x) * (kThreads / 32);
    for (unsigned long long q = static_cast<unsigned long long>(blockIdx.x) * (kThreads / 32) + warp_id(); q < rows * rows;
         q += warps) {
        const unsigned long long a = q / rows, b = q % rows;
        if (b <= a) continue;  // each pair once
        int c = compare_units(index + a * row_len, index + b * row_len, row_len);
        if (c == 0) {
            c = width == 4 ? compare_units(static_cast<const uint32_t*>(values) + a * row_len,
                                           static_cast<const uint32_t*>(values) + b * row_len, row_len)
                           : compare_units(static_cast<const uint16_t*>(values) + a * row_len,
                                           static_cast<const uint16_t*>(values) + b * row_len, row_len);
        }
        if (c == 0) {
            c = compare_units(reinterpret_cast<const uint32_t*>(scales) + a * L,
                              reinterpret_cast<const uint32_t*>(scales) + b * L, static_cast<unsigned long long>(L));
        }
        if (lane_id() == 0) atomicAdd(c <= 0 ? &rank[b] : &rank[a], 1u);  // the later one moves back
    }
}

__global__ void __launch_bounds__(kThreads) order_kernel(const unsigned* rank, unsigned rows, unsigned* order) {
    const unsigned a = blockIdx.x * kThreads + threadIdx.x;
    if (a < rows) order[rank[a]] = a;
}

// Which (row, layer, chunk) a block of a rows × chunks grid works on.
struct ChunkAt {
    unsigned long long row;
    int layer;
    unsigned long long e0, e1;  // entries [e0, e1) of the segment
};
__device__ __forceinline__ ChunkAt chunk_at(const Seg* segs, const unsigned* chunk_begin, int L, unsigned chunks_per_row) {
    ChunkAt at;
    const unsigned c = blockIdx.x % chunks_per_row;
    at.row = blockIdx.x / chunks_per_row;
    at.layer = find_segment(chunk_begin, L, c);
    at.e0 = static_cast<unsigned long long>(c - chunk_begin[at.layer]) * kChunk;
    at.e1 = min_of<unsigned long long>(segs[at.layer].k, at.e0 + kChunk);
    return at;
}

__global__ void __launch_bounds__(kThreads)
chunk_kernel(const Seg* segs, const unsigned* chunk_begin, int L, unsigned chunks_per_row, const uint32_t* index,
             unsigned long long row_len, unsigned long long* chunk_sum, unsigned* zero_first) {
    __shared__ unsigned long long s_sum[32];
    __shared__ unsigned s_min[32];
    const ChunkAt at = chunk_at(segs, chunk_begin, L, chunks_per_row);
    const uint32_t* gaps = index + at.row * row_len + segs[at.layer].offset;
    unsigned long long sum = 0;
    unsigned first_zero = 0xffffffffu;
    for (unsigned long long e = at.e0 + threadIdx.x; e < at.e1; e += kThreads) {
        const uint32_t g = gaps[e];
        sum += g;
        if (g == 0 && e < first_zero) first_zero = static_cast<unsigned>(e);
    }
    sum = block_reduce<kThreads>(sum, s_sum, Sum());
    first_zero = block_reduce<kThreads>(first_zero, s_min, Min());
    if (threadIdx.x == 0) {
        chunk_sum[blockIdx.x] = sum;
        if (first_zero != 0xffffffffu) atomicMin(&zero_first[at.row * L + at.layer], first_zero);
    }
}

// Positions are handled as p1 = position + 1 = the sum of the gaps so far: unsigned, 0 before the
// first entry, and an index past the end is p1 > numel.
__global__ void __launch_bounds__(kThreads)
segment_kernel(const Seg* segs, const unsigned* chunk_begin, int L, unsigned chunks_per_row, const uint32_t* index,
               unsigned long long row_len, const unsigned long long* chunk_sum, unsigned long long* chunk_start,
               const unsigned* zero_first, unsigned long long* status) {
    __shared__ unsigned long long s_scan[32];
    __shared__ unsigned s_min[32];
    const unsigned long long row = blockIdx.x / L;
    const int layer = static_cast<int>(blockIdx.x % L);
    const Seg s = segs[layer];
    if (s.k == 0) return;  // the whole block
    const unsigned c0 = chunk_begin[layer], c1 = chunk_begin[layer + 1];
    const unsigned long long slot = row * chunks_per_row;
    unsigned long long carry = 0;
    unsigned over_chunk = 0xffffffffu;  // the first chunk that ends past the layer
    for (unsigned base = c0; base < c1; base += kThreads) {
        const unsigned c = base + threadIdx.x;
        const unsigned long long v = c < c1 ? chunk_sum[slot + c] : 0;
        unsigned long long total;
        const unsigned long long before = block_exclusive_sum<kThreads>(v, s_scan, &total);
        unsigned over = 0xffffffffu;
        if (c < c1) {
            chunk_start[slot + c] = carry + before;
            if (carry + before + v > s.numel) over = c;
        }
        over = block_reduce<kThreads>(over, s_min, Min());
        if (over < over_chunk) over_chunk = over;
        carry += total;
    }
    const unsigned zero = zero_first[row * L + layer];
    unsigned over_entry = 0xffffffffu;
    if (over_chunk != 0xffffffffu) {  // the first entry past the end, within that chunk
        const unsigned long long e0 = static_cast<unsigned long long>(over_chunk - c0) * kChunk;
        const unsigned long long e1 = min_of<unsigned long long>(s.k, e0 + kChunk);
        const uint32_t* gaps = index + row * row_len + s.offset;
        uint32_t g[kChunkItems];
        unsigned long long sum = 0;
#pragma unroll
        for (int q = 0; q < kChunkItems; ++q) {
            const unsigned long long e = e0 + threadIdx.x * kChunkItems + q;
            g[q] = e < e1 ? gaps[e] : 0u;
            sum += g[q];
        }
        unsigned long long total;
        unsigned long long p1 = chunk_start[slot + over_chunk] + block_exclusive_sum<kThreads>(sum, s_scan, &total);
        unsigned first = 0xffffffffu;
#pragma unroll
        for (int q = 0; q < kChunkItems; ++q) {
            const unsigned long long e = e0 + threadIdx.x * kChunkItems + q;
            p1 += g[q];
            if (e < e1 && p1 > s.numel && first == 0xffffffffu) first = static_cast<unsigned>(e);
        }
        over_entry = block_reduce<kThreads>(first, s_min, Min());
    }
    if (threadIdx.x == 0 && (zero != 0xffffffffu || over_entry != 0xffffffffu)) {
        // The CPU walks blocks of 64 gaps: a zero gap is found before the end check of its block.
        const bool repeats = zero != 0xffffffffu && (over_entry == 0xffffffffu || zero / 64 <= over_entry / 64);
        atomicMin(status, ((row * static_cast<unsigned long long>(L) + layer) << 1) | (repeats ? 0ull : 1ull));
    }
}

__global__ void __launch_bounds__(kThreads)
cursor_kernel(const Seg* segs, const unsigned* chunk_begin, int L, unsigned chunks_per_row, unsigned cursors_per_row,
              const uint32_t* index, unsigned long long row_len, const unsigned long long* chunk_start, Cursor* cursors) {
    __shared__ unsigned long long s_scan[32];
    const ChunkAt at = chunk_at(segs, chunk_begin, L, chunks_per_row);
    const Seg s = segs[at.layer];
    const uint32_t* gaps = index + at.row * row_len + s.offset;
    Cursor* cursor = cursors + at.row * cursors_per_row + s.cursor_begin;
    uint32_t g[kChunkItems];
    unsigned long long sum = 0;
#pragma unroll
    for (int q = 0; q < kChunkItems; ++q) {
        const unsigned long long e = at.e0 + threadIdx.x * kChunkItems + q;
        g[q] = e < at.e1 ? gaps[e] : 0u;
        sum += g[q];
    }
    unsigned long long total;
    unsigned long long p1_prev = chunk_start[blockIdx.x] + block_exclusive_sum<kThreads>(sum, s_scan, &total);
#pragma unroll
    for (int q = 0; q < kChunkItems; ++q) {
        const unsigned long long e = at.e0 + threadIdx.x * kChunkItems + q;
        if (e >= at.e1) break;
        const unsigned long long p1 = p1_prev + g[q];
        // Tiles after the previous entry's, up to this entry's, start at this entry.
        const long long tile_prev = p1_prev == 0 ? -1 : static_cast<long long>((p1_prev - 1) / kTileParams);
        const long long tile = static_cast<long long>((p1 - 1) / kTileParams);
        for (long long t = tile_prev + 1; t <= tile; ++t)
            cursor[t] = Cursor{static_cast<unsigned>(e), static_cast<unsigned>(p1_prev)};
        if (e + 1 == s.k)  // the segment's last entry: the remaining tiles and the end mark
            for (long long t = tile + 1; t <= static_cast<long long>(s.tiles); ++t)
                cursor[t] = Cursor{static_cast<unsigned>(s.k), static_cast<unsigned>(p1)};
        p1_prev = p1;
    }
}

__global__ void __launch_bounds__(kThreads)
apply_kernel(const Seg* segs, const unsigned* tile_begin, int L, unsigned cursors_per_row, unsigned rows,
             const unsigned* order, const Cursor* cursors, const uint32_t* index, const void* values, int width,
             const float* scales, unsigned long long row_len, float alpha) {
    __shared__ float s_param[kTileParams];
    __shared__ uint32_t s_pos[kStage];
    __shared__ float s_val[kStage];
    __shared__ unsigned s_row[kRowGroup];
    __shared__ unsigned s_entry[kRowGroup];
    __shared__ unsigned s_prev1[kRowGroup];
    __shared__ float s_scale[kRowGroup];
    __shared__ unsigned s_start[kRowGroup + 1];
    __shared__ unsigned s_scan[32];
    __shared__ int s_touched;

    const unsigned tile = blockIdx.x;
    const int layer = find_segment(tile_begin, L, tile);
    const Seg s = segs[layer];
    const unsigned j = tile - tile_begin[layer];
    const unsigned lo = j * kTileParams;  // numel < 2^32
    const unsigned count = static_cast<unsigned>(min_of<unsigned long long>(kTileParams, s.numel - lo));
    float* param = s.param + lo;
    for (unsigned q = threadIdx.x; q < count; q += kThreads) s_param[q] = param[q];
    if (threadIdx.x == 0) s_touched = 0;

    for (unsigned g0 = 0; g0 < rows; g0 += kRowGroup) {
        const unsigned R = min_of(kRowGroup, rows - g0);
        unsigned n_row = 0;
        if (threadIdx.x < R) {
            const unsigned row = order[g0 + threadIdx.x];
            const Cursor* c = cursors + static_cast<unsigned long long>(row) * cursors_per_row + s.cursor_begin + j;
            const Cursor c0 = c[0], c1 = c[1];
            n_row = c1.entry - c0.entry;
            s_row[threadIdx.x] = row;
            s_entry[threadIdx.x] = c0.entry;
            s_prev1[threadIdx.x] = c0.prev1;
            s_scale[threadIdx.x] = scales[static_cast<unsigned long long>(row) * L + layer];
        }
        unsigned M;
        const unsigned start = block_exclusive_sum<kThreads>(n_row, s_scan, &M);
        if (threadIdx.x < R) s_start[threadIdx.x] = start;
        if (threadIdx.x == 0) {
            s_start[R] = M;
            if (M > 0) s_touched = 1;
        }
        __syncthreads();

        // The group's entries in this tile, row after row in canonical order, kStage at a time.
        for (unsigned bs = 0; bs < M; bs += kStage) {
            const unsigned be = min_of(M, bs + kStage), nb = be - bs;
            for (unsigned v = bs + threadIdx.x; v < be; v += kThreads) {
                const int r = find_segment(s_start, static_cast<int>(R), v);
                const unsigned long long at =
                    static_cast<unsigned long long>(s_row[r]) * row_len + s.offset + s_entry[r] + (v - s_start[r]);
                s_pos[v - bs] = index[at];
                s_val[v - bs] = width == 4 ? static_cast<const float*>(values)[at]
                                           : __half2float(static_cast<const __half*>(values)[at]);
            }
            __syncthreads();
            // Inclusive sums of the staged gaps (mod 2^32, differences are exact), 4 per thread.
            uint32_t g[kStageItems];
            uint32_t sum = 0;
#pragma unroll
            for (unsigned q = 0; q < kStageItems; ++q) {
                const unsigned x = threadIdx.x * kStageItems + q;
                g[q] = x < nb ? s_pos[x] : 0u;
                sum += g[q];
            }
            unsigned total;
            uint32_t run = block_exclusive_sum<kThreads>(sum, s_scan, &total);
#pragma unroll
            for (unsigned q = 0; q < kStageItems; ++q) {
                const unsigned x = threadIdx.x * kStageItems + q;
                run += g[q];
                if (x < nb) s_pos[x] = run;
            }
            __syncthreads();
            // Position = the row's position before its first entry here + its gaps since then.
            uint32_t pos[kStageItems];
#pragma unroll
            for (unsigned q = 0; q < kStageItems; ++q) {
                const unsigned x = threadIdx.x * kStageItems + q;
                if (x >= nb) break;
                const unsigned v = bs + x;
                const int r = find_segment(s_start, static_cast<int>(R), v);
                const unsigned first = max_of(s_start[r], bs);
                const uint32_t before = first == bs ? 0u : s_pos[first - bs - 1];
                pos[q] = s_prev1[r] - 1u + (s_pos[x] - before);
            }
            __syncthreads();
#pragma unroll
            for (unsigned q = 0; q < kStageItems; ++q) {
                const unsigned x = threadIdx.x * kStageItems + q;
                if (x < nb) s_pos[x] = pos[q];
            }
            __syncthreads();
            if (threadIdx.x == 0 && be < M) {  // a row cut by the batch end goes on from here
                const int r = find_segment(s_start, static_cast<int>(R), be - 1);
                if (s_start[r + 1] > be) s_prev1[r] = s_pos[nb - 1] + 1u;
            }
            // Apply, one row at a time: rows may share positions, a row never repeats one.
            const int r_first = find_segment(s_start, static_cast<int>(R), bs);
            const int r_last = find_segment(s_start, static_cast<int>(R), be - 1);
            for (int r = r_first; r <= r_last; ++r) {
                const unsigned v0 = max_of(s_start[r], bs), v1 = min_of(s_start[r + 1], be);
                if (v0 >= v1) continue;  // the same for every thread
                const float scale = s_scale[r];
                for (unsigned v = v0 + threadIdx.x; v < v1; v += kThreads) {
                    const unsigned p = s_pos[v - bs] - lo;
                    // param −= alpha · (value · scale), each product rounded: the CPU's order.
                    s_param[p] = __fsub_rn(s_param[p], __fmul_rn(alpha, __fmul_rn(s_val[v - bs], scale)));
                }
                __syncthreads();
            }
            __syncthreads();
        }
        __syncthreads();
    }
    if (s_touched)
        for (unsigned q = threadIdx.x; q < count; q += kThreads) param[q] = s_param[q];
}

}  // namespace

BadRow subtract_sparse_cuda(const std::vector<SubtractLayer>& layers, const StoredRows& rows, float alpha,
                            void* stream_handle) {
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    const int L = static_cast<int>(layers.size());
    const unsigned long long S = rows.rows, K = rows.row_len;
    if (S == 0 || L == 0) return {};
    if (S >= (1ull << 31)) throw std::invalid_argument("too many rows");

    // Host tables: layers, their chunk and tile ranges.
    std::vector<Seg> segs(L);
    std::vector<unsigned> chunk_begin(L + 1, 0), tile_begin(L + 1, 0);
    unsigned long long offset = 0, chunks = 0, tiles = 0, cursors = 0;
    for (int i = 0; i < L; ++i) {
        const SubtractLayer& l = layers[i];
        const unsigned t = l.k > 0 ? static_cast<unsigned>((l.numel + kTileParams - 1) / kTileParams) : 0u;
        segs[i] = Seg{l.param, l.numel, l.k, offset, t, static_cast<unsigned>(cursors)};
        chunk_begin[i] = static_cast<unsigned>(chunks);
        tile_begin[i] = static_cast<unsigned>(tiles);
        offset += l.k;
        chunks += (l.k + kChunk - 1) / kChunk;
        tiles += t;
        cursors += t + 1;
    }
    chunk_begin[L] = static_cast<unsigned>(chunks);
    tile_begin[L] = static_cast<unsigned>(tiles);
    if (offset != K) throw std::invalid_argument("row_len must be the sum of k");
    if (S * chunks >= (1ull << 31) || S * L >= (1ull << 31) || tiles >= (1ull << 31) || S * cursors >= (1ull << 40))
        throw std::invalid_argument("too many rows or entries for one call");
    const unsigned CR = static_cast<unsigned>(chunks), CC = static_cast<unsigned>(cursors);

    Carve c;
    const size_t at_segs = c.take(L * sizeof(Seg));
    const size_t at_chunk_begin = c.take((L + 1) * sizeof(unsigned));
    const size_t at_tile_begin = c.take((L + 1) * sizeof(unsigned));
    const size_t upload_end = c.offset;
    const size_t at_rank = c.take(S * sizeof(unsigned));
    const size_t at_cursors = c.take(S * cursors * sizeof(Cursor));
    const size_t zero_end = c.offset;
    const size_t at_zero_first = c.take(S * L * sizeof(unsigned));
    const size_t at_status = c.take(sizeof(unsigned long long));
    const size_t ones_end = c.offset;
    const size_t at_order = c.take(S * sizeof(unsigned));
    const size_t at_chunk_sum = c.take(S * chunks * sizeof(unsigned long long));
    const size_t at_chunk_start = c.take(S * chunks * sizeof(unsigned long long));
    Workspace ws(nullptr, 0, c.offset, stream);

    std::vector<char> upload(upload_end, 0);
    std::memcpy(upload.data() + at_segs, segs.data(), L * sizeof(Seg));
    std::memcpy(upload.data() + at_chunk_begin, chunk_begin.data(), (L + 1) * sizeof(unsigned));
    std::memcpy(upload.data() + at_tile_begin, tile_begin.data(), (L + 1) * sizeof(unsigned));
    // From pageable memory: this may wait for the stream, which is waited for below anyway.
    check(cudaMemcpyAsync(ws.at<char>(0), upload.data(), upload_end, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    check(cudaMemsetAsync(ws.at<char>(at_rank), 0, zero_end - at_rank, stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(ws.at<char>(at_zero_first), 0xff, ones_end - at_zero_first, stream), "cudaMemsetAsync");

    const Seg* d_segs = ws.at<Seg>(at_segs);
    const unsigned* d_chunk_begin = ws.at<unsigned>(at_chunk_begin);
    const unsigned* d_tile_begin = ws.at<unsigned>(at_tile_begin);
    unsigned* rank = ws.at<unsigned>(at_rank);
    unsigned* order = ws.at<unsigned>(at_order);
    Cursor* d_cursors = ws.at<Cursor>(at_cursors);
    unsigned* zero_first = ws.at<unsigned>(at_zero_first);
    unsigned long long* status = ws.at<unsigned long long>(at_status);
    unsigned long long* chunk_sum = ws.at<unsigned long long>(at_chunk_sum);
    unsigned long long* chunk_start = ws.at<unsigned long long>(at_chunk_start);
    const int width = rows.encoding == Encoding::Float32 ? 4 : 2;
    const unsigned blocks_wide = static_cast<unsigned>(multiprocessors()) * 8;

    if (S > 1) {
        const unsigned grid = static_cast<unsigned>(std::min<unsigned long long>((S * S + 7) / 8, blocks_wide));
        launch("rank", rank_kernel, grid, kThreads, stream, rows.index, rows.values, width, rows.scales, S, K, L, rank);
    }
    launch("order", order_kernel, static_cast<unsigned>((S + kThreads - 1) / kThreads), kThreads, stream, rank,
           static_cast<unsigned>(S), order);
    launch("chunk", chunk_kernel, static_cast<unsigned>(S * CR), kThreads, stream, d_segs, d_chunk_begin, L, CR,
           rows.index, K, chunk_sum, zero_first);
    launch("segment", segment_kernel, static_cast<unsigned>(S * L), kThreads, stream, d_segs, d_chunk_begin, L, CR,
           rows.index, K, chunk_sum, chunk_start, zero_first, status);

    unsigned long long verdict = 0;
    check(cudaMemcpyAsync(&verdict, status, sizeof verdict, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (status)");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (verdict != ~0ull) {
        const unsigned long long seg = verdict >> 1;
        return BadRow{static_cast<int64_t>(seg / L), static_cast<int64_t>(seg % L), (verdict & 1) ? kPastEnd : kRepeats};
    }

    launch("cursor", cursor_kernel, static_cast<unsigned>(S * CR), kThreads, stream, d_segs, d_chunk_begin, L, CR, CC,
           rows.index, K, chunk_start, d_cursors);
    launch("apply", apply_kernel, static_cast<unsigned>(tiles), kThreads, stream, d_segs, d_tile_begin, L, CC,
           static_cast<unsigned>(S), order, d_cursors, rows.index, rows.values, width, rows.scales, K, alpha);
    return {};
}

}  // namespace cuda
}  // namespace pyunlearn
