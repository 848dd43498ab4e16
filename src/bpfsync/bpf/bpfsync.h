/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * bpfsync.h — helpers for BPF programs whose maps bpfsync keeps consistent across nodes.
 *
 * Include it after vmlinux.h (or <linux/bpf.h>); it pulls in <bpf/bpf_helpers.h>. Installed with
 * the Python package, next to it in bpfsync/bpf/:
 *
 *     clang -target bpf -O2 -g -I"$(python3 -c 'import bpfsync, os;
 *         print(os.path.join(os.path.dirname(bpfsync.__file__), "bpf"))')" ...
 *
 * Exact counters. With `counters: exact` the agent never writes the map the program counts in
 * (the "main" map: each node's entry holds only this node's own count); it writes, for every key,
 * the merged value of the OTHER nodes into a "companion" map of the same key and value type. The
 * cluster-wide count is then own + companion, read here:
 *
 *     struct rl_value *own = bpf_map_lookup_elem(&rl_counts, &key);
 *     __u64 total = BPFSYNC_COUNTER_TOTAL(&rl_peers, &key, own, struct rl_value, count);
 *
 * With an `epoch` field (a window number: policy {count: counter, window: epoch}) the
 * companion's count belongs to the window in its epoch field; it only adds to the own count when
 * that window is the own entry's window (an older window is stale, a newer one means this node
 * has not yet started the new window and will reset its entry on its next packet):
 *
 *     __u64 total = BPFSYNC_COUNTER_TOTAL_EPOCH(&rl_peers, &key, own, struct rl_value,
 *                                               count, window);
 *
 * The macros take a struct type and field names, so offsets and widths are compile-time
 * constants (what the verifier wants for map-value accesses) and any unsigned field width works.
 * The function forms, bpfsync_counter_total() and bpfsync_counter_total_epoch(), take byte
 * offsets (use offsetof) of __u64 fields; they are __always_inline, so constant offsets stay
 * constant. The total is a __u64 sum, not wrapped to the field's width.
 *
 * Concurrent updates: the own entry is read once with a volatile load per field, so a total is
 * never made of a torn or re-read value; it may of course be a packet or two stale on a busy
 * multi-CPU node, and the companion lags the other nodes by the agent's sync delay (poll interval
 * plus one network hop). A limiter built on it overshoots by about rate x that delay.
 *
 * Time. Values compared across nodes (windows, last-seen stamps merged with `max`) need a clock
 * that agrees across machines: bpf_ktime_get_ns() and _boot_ns() count from each node's boot.
 * bpfsync_now_ns() is CLOCK_TAI (kernel 6.1+), which NTP keeps in step with the other nodes;
 * bpfsync_window() numbers fixed windows of that clock, the same number on every node.
 */
#ifndef BPFSYNC_H
#define BPFSYNC_H

#include <bpf/bpf_helpers.h>

/* One load of an lvalue that other CPUs (or the agent) may change under us. */
#define BPFSYNC_READ(x) (*(const volatile __typeof__(x) *)&(x))

/* Nanoseconds of CLOCK_TAI: comparable across NTP-synced nodes, unlike ktime_get_ns(). */
static __always_inline __u64 bpfsync_now_ns(void)
{
	return bpf_ktime_get_tai_ns();
}

/* The number of the fixed window of window_ns nanoseconds that now falls in (0 if window_ns is
 * 0: one window forever rather than a division by zero). */
static __always_inline __u64 bpfsync_window(__u64 window_ns)
{
	return window_ns ? bpfsync_now_ns() / window_ns : 0;
}

/* own_count plus the __u64 at count_offset of the companion's value for key (0 if none). */
static __always_inline __u64 bpfsync_counter_total(void *companion, const void *key,
						   __u64 own_count, const __u32 count_offset)
{
	const __u8 *peers = bpf_map_lookup_elem(companion, key);

	if (!peers)
		return own_count;
	return own_count + *(const volatile __u64 *)(peers + count_offset);
}

/* As bpfsync_counter_total(), but the companion's count is added only when its __u64 epoch at
 * epoch_offset equals own_epoch. */
static __always_inline __u64 bpfsync_counter_total_epoch(void *companion, const void *key,
							 __u64 own_count, __u64 own_epoch,
							 const __u32 count_offset,
							 const __u32 epoch_offset)
{
	const __u8 *peers = bpf_map_lookup_elem(companion, key);

	if (!peers || *(const volatile __u64 *)(peers + epoch_offset) != own_epoch)
		return own_count;
	return own_count + *(const volatile __u64 *)(peers + count_offset);
}

#define __BPFSYNC_CHECK_FIELD(type, field)						\
	_Static_assert(sizeof(((type *)0)->field) <= sizeof(__u64),			\
		       "bpfsync: " #field " must be an integer of at most 64 bits")

/* (__u64) own->field + the companion's field for key; own points to the main map's value. */
#define BPFSYNC_COUNTER_TOTAL(companion, key, own, type, field)				\
	({										\
		__BPFSYNC_CHECK_FIELD(type, field);					\
		const type *__bs_own = (own);						\
		const type *__bs_peers = bpf_map_lookup_elem((companion), (key));	\
		__u64 __bs_total = BPFSYNC_READ(__bs_own->field);			\
		if (__bs_peers)								\
			__bs_total += BPFSYNC_READ(__bs_peers->field);			\
		__bs_total;								\
	})

/* As BPFSYNC_COUNTER_TOTAL, counting the companion's field only when its epoch field equals
 * own's (the same window). */
#define BPFSYNC_COUNTER_TOTAL_EPOCH(companion, key, own, type, field, epoch)		\
	({										\
		__BPFSYNC_CHECK_FIELD(type, field);					\
		__BPFSYNC_CHECK_FIELD(type, epoch);					\
		const type *__bs_own = (own);						\
		const type *__bs_peers = bpf_map_lookup_elem((companion), (key));	\
		__u64 __bs_total = BPFSYNC_READ(__bs_own->field);			\
		if (__bs_peers &&							\
		    BPFSYNC_READ(__bs_peers->epoch) == BPFSYNC_READ(__bs_own->epoch))	\
			__bs_total += BPFSYNC_READ(__bs_peers->field);			\
		__bs_total;								\
	})

#endif /* BPFSYNC_H */
