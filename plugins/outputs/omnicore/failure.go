package omnicore

import (
	"fmt"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// writeFailure is the error of a Write that left messages not acknowledged.
// Built in, Telegraf's agent logs it once per flush interval while an outage
// lasts ("E! [agent] Error writing to outputs.omnicore: ..."), which no plugin
// can silence, so it is one short sentence: what went wrong and where the
// metrics wait. The session's own lines tell the reason, once. Under execd
// the binary's runner says where they wait (spool or memory).
func (o *OmniCore) writeFailure(failed, total int, timeout time.Duration, first error) error {
	where := ""
	if o.Host.RouteName() == gateway.RouteBuiltIn {
		where = ", the metrics stay in Telegraf's buffer"
	}
	msg := fmt.Sprintf("%d of %d messages not acknowledged within write_timeout (%s)%s", failed, total, time.Duration(o.WriteTimeout), where)
	if timeout < time.Duration(o.WriteTimeout) {
		msg = fmt.Sprintf("%d of %d messages not sent: the gateway is not connected to the bridge%s", failed, total, where)
	}
	return &quietError{msg: msg, err: first}
}

// quietError is an error whose text leaves its cause out (errors.Is still
// finds it): the cause is "context deadline exceeded" or the like, which
// says nothing to a reader of Telegraf's log.
type quietError struct {
	msg string
	err error
}

func (e *quietError) Error() string { return e.msg }
func (e *quietError) Unwrap() error { return e.err }
