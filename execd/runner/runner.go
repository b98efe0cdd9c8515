// Package runner feeds an output plugin from standard input, where Telegraf's
// outputs.execd writes line protocol: the output half of the execd host.
//
// One runner, one queue. Standard input is read continuously, one line at a
// time (bounded by MaxLine), and each line is queued as it was read: in the
// spool on disk when there is one (spool = true, the default) and its disk
// works, else in memory (bounded by MemoryLimit). The publisher reads the
// queue in order, parses each line once, writes batches with up to
// maxWritesInFlight Writes at once and releases a batch once the bridge
// acknowledged it and every earlier one. One connect loop and one retry loop
// share one back-off and one outage log.
//
// What the runner promises Telegraf: its pipe is always read (a stop of
// Telegraf never waits on it for more than stallTimeout), and the process
// exits within Telegraf's grace period (outputs.execd closes stdin, sends
// SIGTERM 5 s later and SIGKILL 5 s after that).
package runner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// DefaultMemoryLimit bounds the lines held in memory: what the spool cannot
// take (spool off, spool full, disk failed). 16 MiB is about 80,000 metrics
// of 200 bytes, more than Telegraf's default metric_buffer_limit of 10,000.
const DefaultMemoryLimit = 16 << 20

// NoSpoolMemoryLimit is the memory of a runner without a spool (spool =
// false): a few batches, so that the backlog waits in Telegraf's buffer
// (metric_buffer_limit) through back-pressure on the pipe, and a stop or
// `telegraf --once` leaves little in memory. The price: a stop while the
// bridge is down waits on the pipe until the bridge returns or the process
// is killed (the spool, on by default, has no such wait).
const NoSpoolMemoryLimit = 1 << 20

// Back-off between attempts to connect and to write: from minBackoff,
// doubling, to maxBackoff. One cap for both, and a short one: while the
// bridge is down a retry costs one failed attempt (a Write to a
// disconnected gateway gives up within a second), the metrics wait in the
// queue, not in Telegraf, and a long back-off is paid in full after the
// bridge comes back.
const (
	minBackoff = time.Second
	maxBackoff = 5 * time.Second
)

// Stop budgets, inside outputs.execd's grace period (SIGTERM 5 s after it
// closed stdin, SIGKILL 5 s after that).
const (
	// drainBudget bounds publishing after stdin EOF (a stop of Telegraf,
	// telegraf --once): what is queued is written while the bridge
	// acknowledges, then the process exits.
	drainBudget = 4 * time.Second
	// signalBudget bounds the exit after SIGTERM or SIGINT.
	signalBudget = 900 * time.Millisecond
	// stallTimeout is how long standard input is left unread at most while
	// memory is full with spool_full = "backpressure": when the bridge has
	// acknowledged nothing for this long, lines are taken again and the
	// oldest in memory dropped, so that Telegraf's stop (whose last flush
	// writes into this pipe and waits) never hangs.
	stallTimeout = 5 * time.Second
)

// Config is what Run needs.
type Config struct {
	Output       telegraf.Output
	Log          telegraf.Logger
	BatchSize    int
	BatchTimeout time.Duration
	// Spool, when not nil, is the spool to open; nil queues in memory only.
	Spool *spool.Options
	// Full is what happens when memory is full too (and, for the spool,
	// when it is full).
	Full spool.FullPolicy
	// MemoryLimit bounds the bytes of lines held in memory
	// (DefaultMemoryLimit when 0).
	MemoryLimit int64
	// Conn returns the output's gateway connection after Connect, for the
	// queue's gauges (nil: none).
	Conn func() gateway.Conn
}

// overlapper is implemented by outputs.omnicore: whether a batch may be
// written while other Writes are in flight (not when it holds a device's
// state, whose order matters). An output without it is written one batch
// at a time.
type overlapper interface {
	Overlappable([]telegraf.Metric) bool
}

// Runner runs one output from standard input.
type Runner struct {
	cfg Config
	log telegraf.Logger

	minBackoff, maxBackoff time.Duration
	drainBudget            time.Duration
	signalBudget           time.Duration
	stallTimeout           time.Duration
	reportEvery            time.Duration
	// reopenEvery is how often a spool that could not be opened for its
	// disk's reason is opened again (an open spool tries its disk itself).
	reopenEvery time.Duration
	// lockWait is how long openQueue waits for the spool before it starts
	// with memory (the constant lockWait; tests raise it to start with
	// the spool on a loaded machine).
	lockWait time.Duration

	q        *queue
	source   string // where the backlog is kept, for the logs and gauges
	stopping atomic.Bool
	outage   outage

	connected  atomic.Pointer[gateway.Conn]
	tooLong    atomic.Int64
	dropLog    rateLog
	reportMu   sync.Mutex
	lastReport map[string]int64
}

// New returns a runner for cfg.
func New(cfg Config) *Runner {
	if cfg.MemoryLimit == 0 {
		cfg.MemoryLimit = DefaultMemoryLimit
	}
	if cfg.Full == "" {
		cfg.Full = spool.Backpressure
	}
	return &Runner{
		cfg:          cfg,
		log:          cfg.Log,
		minBackoff:   minBackoff,
		maxBackoff:   maxBackoff,
		drainBudget:  drainBudget,
		signalBudget: signalBudget,
		stallTimeout: stallTimeout,
		reportEvery:  gateway.GaugeTTL / 6,
		reopenEvery:  5 * time.Second,
		lockWait:     lockWait,
	}
}

// Run opens the queue, runs until stdin EOF or stop, and returns within the
// budgets above. It returns an error when it could not start, or one
// wrapping ErrLost with the count of the metrics it could not keep.
func (r *Runner) Run(stdin io.Reader, stop <-chan struct{}) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	q, err := r.openQueue(ctx)
	if err != nil {
		if ctx.Err() != nil {
			r.log.Info("Stopped while waiting for the spool's lock")
			return nil
		}
		return err
	}
	r.q = q
	r.outage = outage{log: r.log, where: r.where, backlog: q.Backlog, retry: r.maxBackoff, gatewayDown: r.gatewayDown}
	r.dropLog = rateLog{log: r.log, every: time.Minute}

	eof := make(chan struct{})
	go r.readLoop(stdin, eof)

	draining := make(chan struct{}) // write what is there, no waiting, no retries
	abandon := make(chan struct{})  // return even with a Write running
	published := make(chan bool, 1) // true when a Write is still running
	go func() { published <- r.publishLoop(draining, abandon) }()

	stopReports := make(chan struct{})
	reported := make(chan struct{})
	go r.reportLoop(stopReports, reported)

	var budget time.Duration
	signalled := stop // a signal during the drain abandons it
	select {
	case <-eof:
		budget = r.drainBudget
		if r.outage.isActive() || r.gatewayDown() {
			// The bridge is away: nothing to wait for. A first Connect
			// still in progress is not that (telegraf --once ends its
			// input at once): the drain waits for it, within the budget.
			budget = r.signalBudget
		}
		r.log.Debugf("Standard input closed; publishing what is queued for at most %s while the bridge acknowledges", budget)
	case <-stop:
		budget = r.signalBudget
		signalled = nil
		r.stopping.Store(true)
		r.log.Debug("Signalled to stop; queueing what is left in the pipe, then stopping")
		// What Telegraf already wrote into the pipe counts as delivered
		// for it: take it, until EOF or 40% of the budget.
		t := time.NewTimer(budget * 4 / 10)
		select {
		case <-eof:
		case <-t.C:
		}
		t.Stop()
		budget -= budget * 4 / 10
	}
	r.stopping.Store(true)
	deadline := time.Now().Add(budget)
	q.Commit()

	close(draining)
	writing := false
	t := time.NewTimer(time.Until(deadline) * 9 / 10)
	select {
	case writing = <-published:
	case <-signalled:
		close(abandon)
		writing = r.awaitAbandoned(published)
	case <-t.C:
		close(abandon)
		writing = r.awaitAbandoned(published)
	}
	t.Stop()
	close(stopReports)
	<-reported
	return r.finish(writing, deadline)
}

// ErrLost is wrapped by the error Run returns when metrics held in memory
// could not be kept at the stop.
var ErrLost = errors.New("lost")

func (r *Runner) awaitAbandoned(published <-chan bool) bool {
	select {
	case w := <-published:
		return w
	case <-time.After(50 * time.Millisecond):
		return true // stuck in Connect: treat it as a running Write
	}
}

// finish closes the queue and the output; the error counts the metrics
// that could not be kept.
func (r *Runner) finish(writing bool, deadline time.Time) error {
	backlog := r.q.Backlog()
	lost, err := r.q.Close()
	if err != nil {
		r.log.Errorf("Closing the spool: %v", err)
	}
	var result error
	if lost > 0 {
		result = fmt.Errorf("%d metrics not acknowledged by the bridge are %w: they were held in memory, and %s", lost, ErrLost, r.why())
	} else if backlog > 0 {
		r.log.Infof("Stopping with %d metrics in the spool not acknowledged by the bridge yet; they are sent after the next start", backlog)
	}
	if writing {
		// Close must not run concurrently with Write; the process exits
		// without it, which closes the connection all the same.
		r.log.Debug("Not closing the output: a Write is still running")
		return result
	}
	closed := make(chan error, 1)
	go func() { closed <- r.cfg.Output.Close() }()
	t := time.NewTimer(max(time.Until(deadline), 50*time.Millisecond))
	defer t.Stop()
	select {
	case err := <-closed:
		if err != nil {
			r.log.Errorf("Closing the output failed: %v", err)
		}
	case <-t.C:
		r.log.Debug("Closing the output did not finish in time; exiting anyway")
	}
	return result
}

// why says why metrics held in memory cannot be kept at a stop.
func (r *Runner) why() string {
	if r.cfg.Spool == nil {
		return "spool = false"
	}
	return "the spool could not take them (full, or its disk failed)"
}

// gatewayDown reports whether the gateway's connection is down: its session
// (in this process or the one that owns the connection) then tells the
// outage, with this runner's backlog (from its gauges).
func (r *Runner) gatewayDown() bool {
	c := r.connected.Load()
	return c != nil && !(*c).Stats().Connected
}

// where says where the backlog is kept now, for the logs.
func (r *Runner) where() string {
	st := r.q.Stats()
	switch {
	case r.cfg.Spool == nil:
		return "in Telegraf's buffer (spool = false: standard input waits)"
	case !st.hasSpool || st.spoolDown:
		return "in memory while the spool's disk fails"
	default:
		return "in the spool " + r.cfg.Spool.Dir
	}
}

// lockWait is how long openQueue waits for the spool before it starts with
// memory: Open waits while another process holds the spool's lock (a
// previous instance still stopping, or two outputs of one spool), and
// standard input must be read meanwhile, or Telegraf's Write blocks on the
// pipe and its stop with it.
const lockWait = 200 * time.Millisecond

// openQueue opens the spool (when on) and returns the queue. A spool that
// cannot be opened for a reason of its disk (full, read-only, I/O error)
// is an outage of the disk: the queue starts in memory and reopenLoop
// tries the spool again. A spool that takes longer than lockWait to open
// (its lock is held) is attached when it opens; memory holds the lines
// meanwhile.
func (r *Runner) openQueue(ctx context.Context) (*queue, error) {
	if r.cfg.Spool == nil {
		r.log.Debugf("spool = false: queueing standard input in memory (up to %d KiB), the backlog waits in Telegraf's buffer", r.cfg.MemoryLimit>>10)
		return r.newQueue(nil), nil
	}
	opts := *r.cfg.Spool
	opts.Log = r.log
	opts.Full = r.cfg.Full
	opts.QuietDisk = true // the queue reports the disk's failures, with what memory holds
	r.cfg.Spool = &opts
	type opened struct {
		sp  *spool.Spool
		err error
	}
	result := make(chan opened, 1)
	go func() {
		sp, err := spool.Open(ctx, opts)
		result <- opened{sp, err}
	}()
	t := time.NewTimer(r.lockWait)
	defer t.Stop()
	select {
	case res := <-result:
		return r.openedQueue(ctx, res.sp, res.err)
	case <-t.C:
	}
	q := r.newQueue(nil)
	go func() {
		res := <-result
		if res.err == nil {
			r.logOpened(res.sp)
			q.Attach(res.sp)
			return
		}
		if ctx.Err() != nil {
			return
		}
		if IsDiskError(res.err) {
			q.mu.Lock()
			q.spoolDown, q.downSince = true, time.Now()
			q.mu.Unlock()
			r.log.Errorf("Opening the spool %s failed (%v): metrics are held in memory (up to %d MiB); trying the spool again every %s",
				opts.Dir, res.err, r.cfg.MemoryLimit>>20, r.reopenEvery)
			r.reopenLoop(ctx, q)
			return
		}
		r.log.Errorf("Opening the spool %s failed: %v; metrics are held in memory only (up to %d MiB), and lost if the process stops before the bridge acknowledges them",
			opts.Dir, res.err, r.cfg.MemoryLimit>>20)
	}()
	return q, nil
}

// openedQueue is the queue after an Open that returned within lockWait.
func (r *Runner) openedQueue(ctx context.Context, sp *spool.Spool, err error) (*queue, error) {
	if err != nil {
		if ctx.Err() != nil || !IsDiskError(err) {
			return nil, fmt.Errorf("opening the spool: %w", err)
		}
		q := r.newQueue(nil)
		q.spoolDown, q.downSince = true, time.Now()
		r.log.Errorf("Opening the spool %s failed (%v): starting with metrics held in memory (up to %d MiB), and trying the spool again every %s",
			r.cfg.Spool.Dir, err, r.cfg.MemoryLimit>>20, r.reopenEvery)
		go r.reopenLoop(ctx, q)
		return q, nil
	}
	r.logOpened(sp)
	return r.newQueue(sp), nil
}

func (r *Runner) logOpened(sp *spool.Spool) {
	if st := sp.Stats(); st.Replayed > 0 {
		r.log.Infof("Replaying %d metrics (%d bytes) spooled by an earlier run in %s, before new ones", st.Replayed, st.Bytes, r.cfg.Spool.Dir)
	} else {
		r.log.Debugf("Spooling to %s", r.cfg.Spool.Dir)
	}
}

func (r *Runner) newQueue(sp *spool.Spool) *queue {
	return newQueue(r.log, sp, r.cfg.MemoryLimit)
}

// reopenLoop tries to open the spool every reopenEvery until it opens.
func (r *Runner) reopenLoop(ctx context.Context, q *queue) {
	t := time.NewTicker(r.reopenEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.stopping.Load() {
			return
		}
		octx, cancel := context.WithTimeout(ctx, time.Second)
		sp, err := spool.Open(octx, *r.cfg.Spool)
		cancel()
		if err != nil {
			r.log.Debugf("Opening the spool again failed: %v", err)
			continue
		}
		if sp.DiskErr() == nil {
			r.log.Infof("The spool %s opened after its disk failed; the metrics held in memory move into it", r.cfg.Spool.Dir)
		} else {
			// Opened, but its disk still fails: the I! comes when it
			// works and memory moved back into it.
			r.log.Debugf("The spool %s opened after its disk failed, which still fails: %v", r.cfg.Spool.Dir, sp.DiskErr())
		}
		q.Attach(sp)
		return
	}
}

// readLoop queues stdin line by line until EOF; eof is closed when it
// returns.
func (r *Runner) readLoop(stdin io.Reader, eof chan<- struct{}) {
	defer close(eof)
	lr := newLineReader(stdin, MaxLine, r.q.Commit, func(size int64) {
		r.tooLong.Add(1)
		r.log.Warnf("Dropping an input line of %d bytes: longer than the limit of %d bytes (one metric per line)", size, MaxLine)
	})
	for {
		line, err := lr.Next()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				r.log.Errorf("Reading standard input failed: %v", err)
			}
			r.q.Commit()
			return
		}
		if !r.queueLine(line) {
			return
		}
	}
}

// queueLine queues one line; false when the queue is closed. With memory
// full it waits for space under spool_full = "backpressure" while the bridge
// acknowledges (at most stallTimeout without an acknowledgement, never while
// stopping), else it drops the oldest lines in memory.
func (r *Runner) queueLine(line []byte) bool {
	for {
		space := r.q.Space()
		err := r.q.Append(line)
		switch {
		case err == nil:
			return true
		case errors.Is(err, spool.ErrClosed):
			return false
		case errors.Is(err, spool.ErrTooLarge):
			r.log.Errorf("Dropping a metric of %d bytes of line protocol: it does not fit in the spool (spool_max_size %d bytes)", len(line), r.cfg.Spool.MaxSize)
			return true
		}
		// Memory is full.
		if r.cfg.Full == spool.Backpressure && !r.stopping.Load() {
			wait := r.stallTimeout - r.q.SinceRelease()
			if r.cfg.Spool == nil {
				// Without a spool the backlog belongs in Telegraf's
				// buffer, as with any Telegraf output: standard input
				// stays unread for as long as memory is full (see
				// NoSpoolMemoryLimit).
				wait = 100 * time.Millisecond
			}
			if wait > 0 {
				t := time.NewTimer(min(wait, 100*time.Millisecond))
				select {
				case <-space:
				case <-t.C:
				}
				t.Stop()
				continue
			}
		}
		if n := r.q.AppendDroppingOldest(line); n > 0 {
			r.dropLog.errorOnce(n, func(total int64) string {
				return fmt.Sprintf("Memory is full (%d MiB) and the bridge is not acknowledging: dropping the oldest metrics held in memory, so that standard input is still read (%d dropped so far)",
					r.cfg.MemoryLimit>>20, total)
			})
		}
		return true
	}
}
