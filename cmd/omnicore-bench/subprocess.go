package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// userSubscriber is benchmark 9's subscriber: mosquitto_sub (Debian's
// mosquitto-clients) at QoS 1 in its own process, its output read by the
// receiver, or, without mosquitto_sub, a QoS 1 paho subscriber in this
// process.
//
// A subscriber that falls behind a broker with its defaults loses messages
// there: mosquitto queues at most max_queued_messages (1,000) for it and
// drops the rest. The paho subscriber shares this process's CPU with the
// parsing and counting and, on a loaded machine, fell behind the fastest
// routes; mosquitto_sub does only the protocol and writes each payload to
// a pipe, as a user's `mosquitto_sub -q 1` would.
type userSubscriber struct {
	kind string // for the notes
	// pid is mosquitto_sub's process (0 for the in-process subscriber),
	// whose CPU benchmark 9 reports next to Telegraf's.
	pid  int
	stop func()
}

// startUserSubscriber subscribes to every events topic of the broker at
// server (tcp://host:port) at QoS 1 and feeds r, and returns once a probe
// message published to it came through (the subscription is in place).
func startUserSubscriber(ctx context.Context, server, dir string, r *receiver) (*userSubscriber, error) {
	bin, err := exec.LookPath("mosquitto_sub")
	if err != nil {
		sub, err := subscribeQoS(server, r, 1)
		if err != nil {
			return nil, err
		}
		return &userSubscriber{kind: "a QoS 1 paho subscriber in the benchmark's process (no mosquitto_sub: apt-get install mosquitto-clients)",
			stop: func() { sub.Disconnect(250) }}, nil
	}
	u, err := url.Parse(server)
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "mosquitto_sub.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "-h", u.Hostname(), "-p", u.Port(), "-q", "1", "-V", "mqttv311",
		"-i", fmt.Sprintf("omnicore-bench-subscriber-%d", os.Getpid()),
		"-t", "/"+registryID+"/+/events", "-t", "/"+registryID+"/"+gatewayID+"/events/+")
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		// mosquitto_sub prints each payload and a newline; a payload of
		// line protocol is one metric per line, and an empty line is
		// skipped by the receiver.
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			if len(sc.Bytes()) > 0 {
				r.observe(sc.Bytes())
			}
		}
	}()
	s := &userSubscriber{kind: "mosquitto_sub -q 1 in its own process, its output counted by the benchmark", pid: cmd.Process.Pid, stop: func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		_ = cmd.Wait()
		logf.Close()
	}}
	if err := probeSubscription(ctx, server, r, done); err != nil {
		s.stop()
		out, _ := os.ReadFile(logf.Name())
		return nil, fmt.Errorf("mosquitto_sub: %w: %s", err, lastLines(string(out), 3))
	}
	return s, nil
}

// probeSubscription publishes probe metrics to an events topic until one
// reaches r, then forgets it: the subscriber's SUBSCRIBE is in place.
func probeSubscription(ctx context.Context, server string, r *receiver, exited <-chan struct{}) error {
	opts := mqtt.NewClientOptions().AddBroker(server).SetClientID(fmt.Sprintf("omnicore-bench-probe-%d", os.Getpid())).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second)
	c := mqtt.NewClient(opts)
	if t := c.Connect(); !t.WaitTimeout(15*time.Second) || t.Error() != nil {
		return errors.Join(errors.New("the probe could not connect"), t.Error())
	}
	defer c.Disconnect(250)
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for sent := 1; ; sent++ {
		c.Publish("/"+registryID+"/probe/events", 1, false, "probe x=1 "+strconv.Itoa(sent)+"\n")
		r.waitFor(ctx, 1, 200*time.Millisecond)
		if r.unique() > 0 {
			// The probes sent after the subscription took effect
			// all arrive (QoS 1 both ways), in order: once the last
			// one is in, none can be counted in a run.
			last := []int64{int64(sent)}
			for r.count(last).received == 0 && ctx.Err() == nil {
				r.waitFor(ctx, r.unique()+1, time.Second)
			}
			r.reset(false)
			return nil
		}
		select {
		case <-exited:
			return errors.New("it exited")
		case <-ctx.Done():
			return fmt.Errorf("no probe message came through: %w", ctx.Err())
		default:
		}
	}
}
