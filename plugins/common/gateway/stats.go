package gateway

import (
	"sync"
	"sync/atomic"
	"time"
)

type counters struct {
	connects, connectFailures, connectionLost, renewals atomic.Uint64
	attachesOK, attachesFailed, detaches                atomic.Uint64
	published, acked, retries, received                 atomic.Uint64
	devicesRefused, resentAfterError                    atomic.Uint64
	duplicateSuspected, statesCoalesced                 atomic.Uint64
	mu                                                  sync.Mutex
	errorsByType, droppedByReason                       map[string]uint64
	gauges                                              gaugeBook
}

// Internal drop reasons.
const (
	dropInboundUnroutable = "inbound_unroutable"
	// dropInboundQueueFull counts inbound messages a subscriber lost
	// because its queue was full (its handler slow or blocked).
	dropInboundQueueFull = "inbound_queue_full"
	// dropStateUnsent counts states kept for their device's turn that
	// could not be sent (refused, or the session closed first).
	dropStateUnsent = "state_unsent"
	// dropErrorAfterAck counts messages the bridge acknowledged, then
	// reported as not delivered, and that could not be sent again.
	dropErrorAfterAck = "error_after_ack"
)

// CountDrop implements Conn.
func (s *Session) CountDrop(reason string, n uint64) {
	if reason == StateCoalesced {
		s.c.statesCoalesced.Add(n) // not a loss
		return
	}
	s.c.mu.Lock()
	s.c.droppedByReason[reason] += n
	s.c.mu.Unlock()
}

// ReportGauges implements Conn.
func (s *Session) ReportGauges(source string, gauges map[string]int64) {
	s.c.gauges.report(source, gauges, time.Now())
}

func (s *Session) countError(t string) {
	s.c.mu.Lock()
	s.c.errorsByType[t]++
	s.c.mu.Unlock()
}

// Stats implements Conn.
func (s *Session) Stats() Stats {
	s.mu.Lock()
	cs := s.conn
	attached := 0
	known := len(s.devices)
	connected := cs != nil && !cs.isLost()
	if cs != nil {
		for _, d := range s.devices {
			if d.attachedGen == cs.gen {
				attached++
			}
		}
	}
	s.mu.Unlock()
	st := Stats{
		Connected:          connected,
		Connects:           s.c.connects.Load(),
		ConnectFailures:    s.c.connectFailures.Load(),
		ConnectionLost:     s.c.connectionLost.Load(),
		TokenRenewals:      s.c.renewals.Load(),
		AttachesOK:         s.c.attachesOK.Load(),
		AttachesFailed:     s.c.attachesFailed.Load(),
		Detaches:           s.c.detaches.Load(),
		Attached:           attached,
		Published:          s.c.published.Load(),
		Acked:              s.c.acked.Load(),
		Retries:            s.c.retries.Load(),
		Received:           s.c.received.Load(),
		DevicesRefused:     s.c.devicesRefused.Load(),
		ResentAfterError:   s.c.resentAfterError.Load(),
		DuplicateSuspected: s.c.duplicateSuspected.Load(),
		StatesCoalesced:    s.c.statesCoalesced.Load(),
		Known:              known,
		ErrorsByType:       make(map[string]uint64),
		DroppedByReason:    make(map[string]uint64),
	}
	s.c.mu.Lock()
	for k, v := range s.c.errorsByType {
		st.ErrorsByType[k] = v
	}
	for k, v := range s.c.droppedByReason {
		st.DroppedByReason[k] = v
	}
	s.c.mu.Unlock()
	st.Gauges = s.c.gauges.sum(time.Now())
	return st
}
