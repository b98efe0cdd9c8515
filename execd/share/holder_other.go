//go:build !(linux || darwin || freebsd)

package share

// Holder reports no holder where there is no sharing.
func Holder(string) (pid int, held bool, err error) { return 0, false, nil }
