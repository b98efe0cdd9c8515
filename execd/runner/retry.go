package runner

import (
	"errors"

	"github.com/influxdata/telegraf"
)

// settledError is implemented by the error of a failed outputs.omnicore
// Write: the indices into its batch of the metrics the bridge acknowledged
// (accept) and of those given up on for good (reject, counted as drops).
type settledError interface {
	Settled() (accept, reject []int)
}

// unsettled returns what a failed Write of batch left to write again: the
// batch without the metrics its error reports as settled (all of it when
// the error does not say). The retry of a Write is thereby a Write of its
// own, with no memory in the plugin, so Writes can overlap.
func unsettled(batch []telegraf.Metric, err error) []telegraf.Metric {
	var se settledError
	if !errors.As(err, &se) {
		return batch
	}
	accept, reject := se.Settled()
	if len(accept)+len(reject) == 0 {
		return batch
	}
	settled := make([]bool, len(batch))
	for _, i := range accept {
		if i >= 0 && i < len(batch) {
			settled[i] = true
		}
	}
	for _, i := range reject {
		if i >= 0 && i < len(batch) {
			settled[i] = true
		}
	}
	rest := make([]telegraf.Metric, 0, len(batch))
	for i, m := range batch {
		if !settled[i] {
			rest = append(rest, m)
		}
	}
	return rest
}
