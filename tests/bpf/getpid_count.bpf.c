// SPDX-License-Identifier: GPL-2.0-only
/*
 * getpid_count.bpf.c — a tp_btf program for the generic attach() test: counts getpid() calls
 * made by one process (target_tgid, set through .rodata before load).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define NR_getpid 39 /* x86-64 */

const volatile __u32 target_tgid = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} getpid_calls SEC(".maps");

SEC("tp_btf/sys_enter")
int BPF_PROG(on_sys_enter, struct pt_regs *regs, long id)
{
	__u32 zero = 0;
	__u64 *count;

	if (id != NR_getpid || (bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	count = bpf_map_lookup_elem(&getpid_calls, &zero);
	if (count)
		__sync_fetch_and_add(count, 1);
	return 0;
}
