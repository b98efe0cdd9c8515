package omnicore

import (
	"reflect"
)

// partialWriteErrorType is Telegraf's partial-write error: models.RunningOutput
// (v1.37.2, updateTransaction) removes a batch's MetricsAccept from the
// buffer as written and its MetricsReject as dropped, and keeps the rest for
// the next write.
const partialWriteErrorType = "github.com/influxdata/telegraf/internal.PartialWriteError"

// writeError is what Write returns when some metrics were not acknowledged
// in time. accept and reject are indices into the Write's batch: the
// metrics acknowledged by the bridge and those given up on for good; every
// other metric of the batch is to be written again.
//
// Telegraf declares PartialWriteError in its internal package, which Go does
// not let another module import. errors.As, which RunningOutput uses to find
// it, asks the error itself through an As method when the types differ, so
// writeError fills Telegraf's type by reflection there. Outside Telegraf (the
// execd binary, tests) it is an ordinary error.
type writeError struct {
	err            error
	accept, reject []int
}

func (e *writeError) Error() string { return e.err.Error() }

// Settled returns the indices into the failed Write's batch of the metrics
// acknowledged (accept) and given up on for good (reject): the execd binary
// retries the batch without them.
func (e *writeError) Settled() (accept, reject []int) { return e.accept, e.reject }

func (e *writeError) Unwrap() error { return e.err }

// As implements the errors.As protocol for Telegraf's PartialWriteError.
func (e *writeError) As(target any) bool {
	return e.fill(target, partialWriteErrorType)
}

// fill stores e into target when target is a **T whose T is the struct
// typeName ("pkgpath.Name") with the fields of Telegraf's PartialWriteError
// (Err error, MetricsAccept and MetricsReject []int). A type of any other
// shape is left alone, so a Telegraf that changed it gets a plain error
// (the whole batch is kept) rather than a wrong partial write.
func (e *writeError) fill(target any, typeName string) bool {
	v := reflect.ValueOf(target)
	if v.Kind() != reflect.Pointer || v.IsNil() {
		return false
	}
	ptr := v.Elem()
	if ptr.Kind() != reflect.Pointer || !ptr.CanSet() {
		return false
	}
	t := ptr.Type().Elem()
	if t.Kind() != reflect.Struct || t.PkgPath()+"."+t.Name() != typeName {
		return false
	}
	out := reflect.New(t)
	fields := []struct {
		name  string
		value any
	}{
		{"Err", e.err},
		{"MetricsAccept", e.accept},
		{"MetricsReject", e.reject},
	}
	for _, f := range fields {
		dst := out.Elem().FieldByName(f.name)
		val := reflect.ValueOf(f.value)
		if !dst.IsValid() || !dst.CanSet() || !val.IsValid() || !val.Type().AssignableTo(dst.Type()) {
			return false
		}
		dst.Set(val)
	}
	ptr.Set(out)
	return true
}
