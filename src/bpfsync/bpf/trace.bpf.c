// SPDX-License-Identifier: GPL-2.0-only
/*
 * trace.bpf.c — report every successful update and delete of the watched maps.
 *
 * There is no tracepoint for map writes, so this attaches fexit programs to the kernel functions
 * that implement them: the map ops that both bpf(2) and BPF programs reach
 * (htab_*_update_elem/_delete_elem, array_map_update_elem, trie_update_elem/_delete_elem), and the
 * two syscall-only paths that per-CPU maps take from user space (bpf_percpu_hash_update,
 * bpf_percpu_array_update). fexit sees the return value, so failed ops (-EEXIST, -ENOENT, -E2BIG)
 * are never reported. User space probes the running kernel's BTF and turns autoload off for
 * functions it lacks.
 *
 * Not seen, by construction: writes through a pointer returned by a lookup (in-place updates,
 * atomics), LRU evictions, and elements removed by BPF_MAP_LOOKUP_AND_DELETE_BATCH. The poll
 * watcher covers those.
 *
 * Where the kernel refuses fexit, the syscall hooks at the end of this file report user-space
 * writes instead (user space chooses one set or the other; see trace.py).
 *
 * Every record is a fixed-size struct trace_record (trace.h) in a BPF ring buffer; a full ring
 * drops the record and counts it, per map, so user space can rescan instead of losing a change.
 * The other way to miss a write: the kernel skips a tracing program that is already running on
 * the CPU (a softirq write interrupting one of these programs); it counts that in the program's
 * recursion_misses, which user space also turns into a rescan.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "trace.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TRACE_RING_BYTES);
} events SEC(".maps");

/* Map ids to report (a map id is local to this kernel; user space maps it back to a name). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TRACE_WATCH_MAX);
	__type(key, __u32);
	__type(value, struct trace_watch);
} watched SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct trace_config);
} trace_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TRACE_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Agent threads currently inside a map-writing bpf(2) command (key: thread id). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} agent_calls SEC(".maps");

/* ---- interrupt context ---------------------------------------------------------------------
 *
 * The preempt count's softirq/hardirq/NMI bits say whether the CPU is serving an interrupt (or
 * runs with bottom halves disabled) on behalf of whatever task happens to be current. Its home
 * moved between kernels, so both places are weak typed ksyms: the one the running kernel lacks
 * resolves to NULL and the verifier prunes its branch.
 *   - 6.1 and 6.15+: the per-CPU int __preempt_count;
 *   - 6.2 – 6.14:    the per-CPU struct pcpu_hot, field preempt_count.
 * PREEMPT_RT kernels keep the softirq count in task_struct::softirq_disable_cnt instead (a field
 * that exists only there, so CO-RE field existence doubles as the RT test).
 * User space refuses own-write suppression when neither symbol exists (see TraceWatcher). The
 * bit layout (softirq 8-15, hardirq 16-19, NMI 20-23) has been stable since 5.11.
 */
#define TRACE_SOFTIRQ_MASK 0x0000ff00U
#define TRACE_HARDIRQ_MASK 0x000f0000U
#define TRACE_NMI_MASK 0x00f00000U

extern const int __preempt_count __ksym __weak;

struct pcpu_hot___bpfsync {
	int preempt_count;
} __attribute__((preserve_access_index));

extern const struct pcpu_hot___bpfsync pcpu_hot __ksym __weak;

struct task_struct___rt {
	int softirq_disable_cnt;
} __attribute__((preserve_access_index));

/* Non-zero when in interrupt context, or when the context cannot be told (never suppress). */
static __always_inline __u32 in_interrupt(void)
{
	__u32 pc, softirq;

	if (&__preempt_count)
		pc = *(int *)bpf_this_cpu_ptr(&__preempt_count);
	else if (&pcpu_hot && bpf_core_field_exists(struct pcpu_hot___bpfsync, preempt_count))
		pc = ((struct pcpu_hot___bpfsync *)bpf_this_cpu_ptr(&pcpu_hot))->preempt_count;
	else
		return 1;

	softirq = pc & TRACE_SOFTIRQ_MASK;
	if (bpf_core_field_exists(struct task_struct___rt, softirq_disable_cnt)) {
		struct task_struct___rt *task = (void *)bpf_get_current_task();

		softirq = BPF_CORE_READ(task, softirq_disable_cnt) & TRACE_SOFTIRQ_MASK;
	}
	return (pc & (TRACE_HARDIRQ_MASK | TRACE_NMI_MASK)) | softirq;
}

/* ---- own writes ----------------------------------------------------------------------------
 *
 * The agent applies peers' changes to the same maps; reporting those would echo them back to
 * the cluster. The task's tgid alone cannot identify them: an XDP/TC program runs in softirq on
 * behalf of whichever task was interrupted, the agent included, and hiding that write would lose
 * a data-plane change. So a write is the agent's own only when
 *   1. the current task belongs to the agent's process (trace_config.agent_tgid), and
 *   2. the CPU is in task context: no softirq (served or bottom halves disabled), hardirq or NMI
 *      bits in the preempt count, and
 *   3. (TRACE_OWN_SYSCALL) this very thread is inside a bpf(2) command that writes maps — marked
 *      by the fentry/fexit pair on __x64_sys_bpf below.
 * Remaining blind spot: a BPF program that runs synchronously in the agent's own thread, in task
 * context, while that thread is inside a map-writing bpf(2) call (e.g. a kprobe on a function the
 * update calls). TRACE_OWN_TGID (no syscall hook) widens it to any such program run by any agent
 * thread (cgroup sock_addr hooks on the agent's connects, BPF_PROG_TEST_RUN by the agent).
 * Other bpf(2) callers pay one tgid compare in the hooks. x86-64 only (__x64_sys_bpf, the
 * preempt count's home).
 *
 * Verified on 6.1 in the test VM (tests/vm/guest/test_trace.py): the agent's bpf(2) updates,
 * batch updates and deletes are suppressed and counted; the same writes from another process,
 * and BPF_PROG_TEST_RUN writes issued by the agent, are reported; an XDP program on lo writing in
 * softirq while the agent's own thread is current (it sent the packets) is reported with
 * TRACE_F_INTERRUPT. The pcpu_hot branch (6.2 - 6.14) is CO-RE-guarded but not exercised there.
 */
static __always_inline bool is_agent(const struct trace_config *cfg, __u64 pid_tgid)
{
	return cfg->own_mode != TRACE_OWN_OFF && cfg->agent_tgid == (__u32)(pid_tgid >> 32);
}

static __always_inline bool own_write(__u64 pid_tgid, __u32 irq)
{
	__u32 zero = 0, tid;
	struct trace_config *cfg = bpf_map_lookup_elem(&trace_config, &zero);

	if (!cfg || !is_agent(cfg, pid_tgid) || irq)
		return false;
	if (cfg->own_mode == TRACE_OWN_TGID)
		return true;
	tid = (__u32)pid_tgid;
	return bpf_map_lookup_elem(&agent_calls, &tid) != NULL;
}

static __always_inline bool is_map_write_cmd(__u64 cmd)
{
	return cmd == BPF_MAP_UPDATE_ELEM || cmd == BPF_MAP_DELETE_ELEM ||
	       cmd == BPF_MAP_LOOKUP_AND_DELETE_ELEM || cmd == BPF_MAP_UPDATE_BATCH ||
	       cmd == BPF_MAP_DELETE_BATCH || cmd == BPF_MAP_LOOKUP_AND_DELETE_BATCH;
}

SEC("fentry/__x64_sys_bpf")
int BPF_PROG(agent_bpf_enter, const struct pt_regs *regs)
{
	__u32 zero = 0, tid, cmd;
	struct trace_config *cfg = bpf_map_lookup_elem(&trace_config, &zero);
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (!cfg || !is_agent(cfg, pid_tgid))
		return 0;
	cmd = BPF_CORE_READ(regs, di);
	if (!is_map_write_cmd(cmd))
		return 0;
	tid = (__u32)pid_tgid;
	bpf_map_update_elem(&agent_calls, &tid, &cmd, BPF_ANY);
	return 0;
}

SEC("fexit/__x64_sys_bpf")
int BPF_PROG(agent_bpf_exit, const struct pt_regs *regs, long ret)
{
	__u32 zero = 0, tid;
	struct trace_config *cfg = bpf_map_lookup_elem(&trace_config, &zero);
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (!cfg || !is_agent(cfg, pid_tgid) || !is_map_write_cmd(BPF_CORE_READ(regs, di)))
		return 0;
	tid = (__u32)pid_tgid;
	bpf_map_delete_elem(&agent_calls, &tid);
	return 0;
}

/* ---- reporting ----------------------------------------------------------------------------- */

static __always_inline void count(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &slot);

	/* atomic: another of these programs can interrupt this one on the same CPU */
	if (c)
		__sync_fetch_and_add(c, 1);
}

/* A record was lost (ring full, buffer unreadable): counted per map, so user space rescans. */
static __always_inline void dropped(struct trace_watch *w)
{
	__sync_fetch_and_add(&w->dropped, 1);
	count(TRACE_CNT_DROPPED);
}

/* Fill in a reserved record's header and hand it to user space. */
static __always_inline void submit(struct trace_record *rec, __u32 map_id, __u32 ks, __u32 vs,
				   __u8 op, __u8 flags, __u32 tgid, __u32 elements)
{
	rec->map_id = map_id;
	rec->key_len = ks;
	rec->value_len = vs;
	rec->op = op;
	rec->flags = flags;
	rec->count = elements;
	rec->tgid = tgid;
	bpf_ringbuf_submit(rec, 0);
	count(TRACE_CNT_SUBMITTED);
}

static __always_inline bool is_percpu(struct bpf_map *map)
{
	enum bpf_map_type type = BPF_CORE_READ(map, map_type);

	return type == BPF_MAP_TYPE_PERCPU_HASH || type == BPF_MAP_TYPE_PERCPU_ARRAY ||
	       type == BPF_MAP_TYPE_LRU_PERCPU_HASH;
}

static __always_inline int report(struct bpf_map *map, const void *key, const void *value,
				  __u8 op)
{
	__u32 id = BPF_CORE_READ(map, id), ks, vs = 0, irq;
	struct trace_watch *w = bpf_map_lookup_elem(&watched, &id);
	struct trace_record *rec;
	__u64 pid_tgid;
	__u8 flags = 0;

	if (!w)
		return 0;
	pid_tgid = bpf_get_current_pid_tgid();
	irq = in_interrupt();
	if (irq)
		flags |= TRACE_F_INTERRUPT;
	if (own_write(pid_tgid, irq)) {
		count(TRACE_CNT_SUPPRESSED);
		return 0;
	}
	rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	if (!rec) {
		dropped(w);
		return 0;
	}
	ks = BPF_CORE_READ(map, key_size);
	if (ks > TRACE_KEY_MAX)
		ks = TRACE_KEY_MAX;
	bpf_probe_read_kernel(rec->key, ks, key);
	if (op == TRACE_OP_UPDATE) {
		if (!value || is_percpu(map)) {
			flags |= TRACE_F_VALUE_NOT_CAPTURED;
		} else {
			vs = BPF_CORE_READ(map, value_size);
			if (vs > TRACE_VALUE_MAX)
				vs = TRACE_VALUE_MAX;
			bpf_probe_read_kernel(rec->value, vs, value);
		}
	}
	submit(rec, id, ks, vs, op, flags, pid_tgid >> 32, 1);
	return 0;
}

/* `ret` is read as int: 6.1 returns int, later kernels long; 0 is success in both. */
#define TRACE_UPDATE(fn)                                                                     \
	SEC("fexit/" #fn)                                                                    \
	int BPF_PROG(fn##_exit, struct bpf_map *map, void *key, void *value, __u64 flags,     \
		     int ret)                                                                 \
	{                                                                                    \
		return ret ? 0 : report(map, key, value, TRACE_OP_UPDATE);                   \
	}

#define TRACE_DELETE(fn)                                                                     \
	SEC("fexit/" #fn)                                                                    \
	int BPF_PROG(fn##_exit, struct bpf_map *map, void *key, int ret)                      \
	{                                                                                    \
		return ret ? 0 : report(map, key, NULL, TRACE_OP_DELETE);                    \
	}

#define TRACE_LOOKUP_AND_DELETE(fn)                                                          \
	SEC("fexit/" #fn)                                                                    \
	int BPF_PROG(fn##_exit, struct bpf_map *map, void *key, void *value, __u64 flags,     \
		     int ret)                                                                 \
	{                                                                                    \
		return ret ? 0 : report(map, key, NULL, TRACE_OP_DELETE);                    \
	}

/* map ops: reached by bpf(2) and by BPF programs */
TRACE_UPDATE(htab_map_update_elem)
TRACE_UPDATE(htab_lru_map_update_elem)
TRACE_UPDATE(htab_percpu_map_update_elem)
TRACE_UPDATE(htab_lru_percpu_map_update_elem)
TRACE_UPDATE(array_map_update_elem)
TRACE_DELETE(htab_map_delete_elem)
TRACE_DELETE(htab_lru_map_delete_elem)
/* LPM tries: bpf(2)'s batch commands reach these too, one element at a time (the generic batch
 * code); lookup-and-delete does not exist for tries */
TRACE_UPDATE(trie_update_elem)
TRACE_DELETE(trie_delete_elem)
/* bpf(2) BPF_MAP_LOOKUP_AND_DELETE_ELEM on hashes (5.14+) */
TRACE_LOOKUP_AND_DELETE(htab_map_lookup_and_delete_elem)
TRACE_LOOKUP_AND_DELETE(htab_lru_map_lookup_and_delete_elem)
TRACE_LOOKUP_AND_DELETE(htab_percpu_map_lookup_and_delete_elem)
TRACE_LOOKUP_AND_DELETE(htab_lru_percpu_map_lookup_and_delete_elem)
/* bpf(2) updates of per-CPU maps bypass the map ops */
TRACE_UPDATE(bpf_percpu_hash_update)
TRACE_UPDATE(bpf_percpu_array_update)

/* ---- syscall hooks: where the kernel refuses fentry/fexit ----------------------------------
 *
 * Some kernels' policy refuses fentry/fexit (EPERM at load) but runs BTF tracepoints. There, the
 * raw sys_enter/sys_exit tracepoints see every bpf(2) command that writes a map: the map is
 * resolved from the caller's fd table at entry, and at exit, when the command succeeded, the keys
 * and values are read from the caller's buffers (the thread is still in the kernel, so they are
 * exactly what was written). That covers every write made from user space, single or batched,
 * within microseconds. It cannot see BPF programs' writes (no syscall): user space polls for
 * those. Own writes are the agent process's bpf(2) calls: a syscall runs in task context, so the
 * tgid is exact here. The cost to other processes: one compare per syscall (the syscall number).
 * x86-64 only (the syscall number and the argument registers).
 */
#define TRACE_NR_BPF 321
#define TRACE_ENOENT 2

/* A map-writing bpf(2) command between sys_enter and sys_exit (key: thread id). LRU: a thread
 * that never returns from bpf(2) (killed in it) leaves its entry behind, to be evicted. */
struct sys_call {
	__u64 attr;       /* the caller's union bpf_attr */
	__u32 cmd;
	__u32 map_id;
	__u32 key_size;
	__u32 value_size; /* one element in the caller's buffer; 0: not captured (per-CPU) */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct sys_call);
} sys_calls SEC(".maps");

/* The file operations of map fds: only such a file's private_data is a struct bpf_map. Weak:
 * without kallsyms it resolves to 0 and the check is skipped (the command's success at exit
 * then vouches for the fd). */
extern const void bpf_map_fops __ksym __weak;

static __always_inline struct bpf_map *fd_map(__u32 fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds, *file = NULL;

	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	if (&bpf_map_fops && BPF_CORE_READ(file, f_op) != (void *)&bpf_map_fops)
		return NULL;
	return BPF_CORE_READ(file, private_data);
}

static __always_inline bool is_batch_cmd(__u32 cmd)
{
	return cmd == BPF_MAP_UPDATE_BATCH || cmd == BPF_MAP_DELETE_BATCH ||
	       cmd == BPF_MAP_LOOKUP_AND_DELETE_BATCH;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_bpf_enter, struct pt_regs *regs, long id)
{
	struct sys_call call = {};
	__u32 zero = 0, fd = 0, tid;
	struct trace_config *cfg;
	struct bpf_map *map;
	__u64 pid_tgid;

	if (id != TRACE_NR_BPF)
		return 0;
	call.cmd = BPF_CORE_READ(regs, di);
	if (!is_map_write_cmd(call.cmd))
		return 0;
	call.attr = BPF_CORE_READ(regs, si);
	if (bpf_probe_read_user(&fd, sizeof(fd),
				(void *)(call.attr + (is_batch_cmd(call.cmd) ?
						      offsetof(union bpf_attr, batch.map_fd) :
						      offsetof(union bpf_attr, map_fd)))))
		return 0;
	map = fd_map(fd);
	if (!map)
		return 0;
	call.map_id = BPF_CORE_READ(map, id);
	if (!bpf_map_lookup_elem(&watched, &call.map_id))
		return 0;
	pid_tgid = bpf_get_current_pid_tgid();
	cfg = bpf_map_lookup_elem(&trace_config, &zero);
	if (cfg && is_agent(cfg, pid_tgid)) {
		count(TRACE_CNT_SUPPRESSED);
		return 0;
	}
	call.key_size = BPF_CORE_READ(map, key_size);
	call.value_size = is_percpu(map) ? 0 : BPF_CORE_READ(map, value_size);
	tid = (__u32)pid_tgid;
	if (bpf_map_update_elem(&sys_calls, &tid, &call, BPF_ANY)) {
		struct trace_watch *w = bpf_map_lookup_elem(&watched, &call.map_id);

		if (w) /* the write would go unseen: have user space rescan */
			dropped(w);
	}
	return 0;
}

struct user_elems {
	__u64 keys;
	__u64 values; /* 0: deletes, or values not captured */
	struct trace_watch *w;
	__u32 map_id;
	__u32 key_size;
	__u32 value_size;
	__u32 tgid;
	__u32 n;   /* elements in the command */
	__u32 per; /* elements per record (see struct trace_record) */
	__u8 op;
	__u8 flags;
};

/* Record i: up to `per` elements from the caller's buffers, in two reads; non-zero stops the
 * loop (the ring is full or a buffer unreadable: counted as dropped, so user space rescans). */
static long report_user(__u32 i, struct user_elems *e)
{
	__u64 first = (__u64)i * e->per, m, kb, vb = 0;
	struct trace_record *rec;

	if (first >= e->n)
		return 1;
	m = e->n - first;
	if (m > e->per)
		m = e->per;
	rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	if (!rec) {
		dropped(e->w);
		return 1;
	}
	/* each size is clamped right before its read: 6.1's verifier forgets a bound kept
	 * across calls (spilled to the stack) */
	kb = m * e->key_size;
	if (kb > TRACE_KEY_MAX)
		kb = TRACE_KEY_MAX;
	if (bpf_probe_read_user(rec->key, kb, (void *)(e->keys + first * e->key_size)))
		goto unreadable;
	if (e->values) {
		vb = m * e->value_size;
		if (vb > TRACE_VALUE_MAX)
			vb = TRACE_VALUE_MAX;
		if (bpf_probe_read_user(rec->value, vb, (void *)(e->values + first * e->value_size)))
			goto unreadable;
	}
	submit(rec, e->map_id, e->key_size, e->values ? e->value_size : 0, e->op, e->flags, e->tgid,
	       m);
	return 0;
unreadable:
	bpf_ringbuf_discard(rec, 0);
	dropped(e->w);
	return 1;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_bpf_exit, struct pt_regs *regs, long ret)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid, n = 1;
	struct user_elems e = {};
	struct sys_call *p, call;
	const union bpf_attr *attr;

	p = bpf_map_lookup_elem(&sys_calls, &tid);
	if (!p)
		return 0;
	call = *p;
	bpf_map_delete_elem(&sys_calls, &tid);
	if (BPF_CORE_READ(regs, orig_ax) != TRACE_NR_BPF)
		return 0; /* left by a thread that never returned from bpf(2); not ours */
	e.w = bpf_map_lookup_elem(&watched, &call.map_id);
	if (!e.w)
		return 0;
	attr = (const union bpf_attr *)call.attr;
	e.map_id = call.map_id;
	e.key_size = call.key_size;
	e.value_size = call.value_size;
	e.tgid = pid_tgid >> 32;
	e.op = call.cmd == BPF_MAP_UPDATE_ELEM || call.cmd == BPF_MAP_UPDATE_BATCH ?
		       TRACE_OP_UPDATE : TRACE_OP_DELETE;
	if (e.op == TRACE_OP_UPDATE && !call.value_size)
		e.flags = TRACE_F_VALUE_NOT_CAPTURED;
	e.n = e.per = 1;
	if (!is_batch_cmd(call.cmd)) {
		if (ret)
			return 0; /* failed ops change nothing */
		e.keys = BPF_CORE_READ_USER(attr, key);
		if (call.cmd == BPF_MAP_UPDATE_ELEM && call.value_size)
			e.values = BPF_CORE_READ_USER(attr, value);
		report_user(0, &e);
		return 0;
	}
	/* A batch reports how many elements it processed in batch.count, also when it stops at an
	 * error part-way; an error before any element leaves count as the caller set it. So only a
	 * clean run (or lookup-and-delete's normal end, -ENOENT) is reported element by element; any
	 * other error counts as dropped and user space rescans. */
	if (ret && !(ret == -TRACE_ENOENT && call.cmd == BPF_MAP_LOOKUP_AND_DELETE_BATCH)) {
		dropped(e.w);
		return 0;
	}
	n = BPF_CORE_READ_USER(attr, batch.count);
	if (n > TRACE_BATCH_MAX) {
		dropped(e.w);
		return 0;
	}
	e.keys = BPF_CORE_READ_USER(attr, batch.keys);
	if (call.cmd == BPF_MAP_UPDATE_BATCH && call.value_size)
		e.values = BPF_CORE_READ_USER(attr, batch.values);
	/* as many elements per record as its key and value areas hold (watched maps' keys and
	 * values are at most TRACE_KEY_MAX and TRACE_VALUE_MAX bytes, so at least one) */
	e.n = n;
	e.per = call.key_size ? TRACE_KEY_MAX / call.key_size : 1;
	if (e.values && call.value_size && TRACE_VALUE_MAX / call.value_size < e.per)
		e.per = TRACE_VALUE_MAX / call.value_size;
	if (!e.per)
		e.per = 1;
	bpf_loop((n + e.per - 1) / e.per, report_user, &e, 0);
	return 0;
}
