/* SPDX-License-Identifier: Apache-2.0 */
/*
 * trace.h — what trace.bpf.c sends to user space, and the maps user space fills in.
 *
 * Shared by trace.bpf.c and by bpfsync/watch/trace_abi.py, which mirrors these layouts as numpy
 * dtypes / struct formats: change one side and the other in the same commit. Every field has a
 * fixed size and offset (little-endian, no implicit padding), so the record can be decoded in
 * bulk without a C compiler.
 */
#ifndef BPFSYNC_TRACE_H
#define BPFSYNC_TRACE_H

/* Largest key and value the tracer captures; user space refuses to watch larger maps. */
#define TRACE_KEY_MAX 256
#define TRACE_VALUE_MAX 256

/* Default ring size (bytes, a power of two multiple of the page size). */
#define TRACE_RING_BYTES (8 << 20)

/* Most maps one tracer watches at a time. */
#define TRACE_WATCH_MAX 1024

/* Most elements of one bpf(2) batch command the syscall hooks report (packed, see struct
 * trace_record); a larger batch is counted as dropped, so user space rescans the map. */
#define TRACE_BATCH_MAX (1 << 16)

enum trace_op {
	TRACE_OP_UPDATE = 1,
	TRACE_OP_DELETE = 2,
};

enum trace_flag {
	/* The value in the record is not the map's value: a per-CPU map, whose value spans every
	 * CPU, or a program's update that wrote one CPU's share. Re-read it from the map. */
	TRACE_F_VALUE_NOT_CAPTURED = 1,
	/* The op ran in interrupt context (softirq, hardirq, NMI, or bottom halves disabled):
	 * a data-plane write, never suppressed as the agent's own. */
	TRACE_F_INTERRUPT = 2,
};

/* Successful updates or deletes of a watched map: 16 header bytes + keys + values = 528.
 * `count` elements, keys back to back in `key` and values back to back in `value`: 1 for a
 * map op, up to as many as fit for a bpf(2) batch command (16 of a 4-byte key and a 16-byte
 * value). Packed, a 20,000-element batch of small entries takes 0.7 MB of the ring, not 10.7. */
struct trace_record {
	__u32 map_id;
	__u16 key_len;   /* of one element */
	__u16 value_len; /* of one element; 0 for deletes and when TRACE_F_VALUE_NOT_CAPTURED */
	__u8 op;         /* enum trace_op, of every element */
	__u8 flags;      /* enum trace_flag bits */
	__u16 count;     /* elements in this record, >= 1 */
	__u32 tgid;      /* process current when the op ran (in interrupt: whichever was) */
	__u8 key[TRACE_KEY_MAX];
	__u8 value[TRACE_VALUE_MAX];
};

/* Value of the `watched` hash (key: map id). The tracer bumps `dropped` when the ring is full. */
struct trace_watch {
	__u64 dropped;
};

/* How own writes are recognised; see the comment above own_write() in trace.bpf.c. */
enum trace_own_mode {
	TRACE_OWN_OFF = 0,     /* report everything */
	TRACE_OWN_SYSCALL = 1, /* agent thread inside a map-writing bpf(2) call, not in an interrupt */
	TRACE_OWN_TGID = 2,    /* agent process, not in an interrupt (no bpf(2) entry hook) */
};

/* The one entry of the `trace_config` array, written by user space before attaching. */
struct trace_config {
	__u32 agent_tgid;
	__u32 own_mode; /* enum trace_own_mode */
};

/* Slots of the per-CPU `counters` array (summed by user space). */
enum trace_counter {
	TRACE_CNT_SUBMITTED = 0,  /* records put in the ring */
	TRACE_CNT_DROPPED = 1,    /* ring full: record lost (also counted per map in `watched`) */
	TRACE_CNT_SUPPRESSED = 2, /* the agent's own writes, not reported */
	TRACE_CNT_MAX = 3,
};

#endif /* BPFSYNC_TRACE_H */
