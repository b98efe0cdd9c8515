package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// treePIDs are pid and every descendant living now, from
// /proc/<pid>/task/*/children: Telegraf and the plugin processes it runs.
func treePIDs(pid int) []string {
	var out []string
	seen := map[string]bool{}
	queue := []string{strconv.Itoa(pid)}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		out = append(out, p)
		tasks, _ := os.ReadDir("/proc/" + p + "/task")
		for _, t := range tasks {
			b, err := os.ReadFile("/proc/" + p + "/task/" + t.Name() + "/children")
			if err != nil {
				continue
			}
			queue = append(queue, strings.Fields(string(b))...)
		}
	}
	return out
}

// clockTicks is Linux's USER_HZ, the unit of the times in /proc/<pid>/stat:
// 100 on every architecture Go supports (sysconf(_SC_CLK_TCK) needs cgo).
const clockTicks = 100

// treeCPU is the user and system CPU time spent so far by pid's process
// tree: every living process's own time plus the time of the children it
// already waited for (cutime, cstime), so that a child that ran and exited
// (the cat of inputs.execd's sh) is counted once, by its parent. Resolution
// is a clock tick (10 ms) per process.
func treeCPU(pid int) (time.Duration, error) {
	var ticks int64
	for i, p := range treePIDs(pid) {
		b, err := os.ReadFile("/proc/" + p + "/stat")
		if err != nil {
			if i == 0 {
				return 0, err
			}
			continue // a descendant that exited since it was listed
		}
		t, err := statCPUTicks(b)
		if err != nil {
			return 0, fmt.Errorf("/proc/%s/stat: %w", p, err)
		}
		ticks += t
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// statCPUTicks is utime+stime+cutime+cstime of a /proc/<pid>/stat line
// (fields 14 to 17, see proc(5)). The command name (field 2) is in
// parentheses and may hold spaces and parentheses, so fields are counted
// from the last ')'.
func statCPUTicks(stat []byte) (int64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("no command name in %q", stat)
	}
	// After the name: field 3 (state) is rest[0], so field k is rest[k-3].
	rest := strings.Fields(string(stat[i+1:]))
	if len(rest) < 15 {
		return 0, fmt.Errorf("%d fields after the command name, want at least 15", len(rest))
	}
	var sum int64
	for _, f := range rest[11:15] {
		v, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("CPU time %q: %w", f, err)
		}
		sum += v
	}
	return sum, nil
}
