//go:build linux || darwin || freebsd

package share

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// gatedFake is an owner's Conn whose every publish waits for its own gate
// (by payload) and then returns the outcome the test chose for it, so that
// responses come back in the order the test releases them.
type gatedFake struct {
	shareFake
	gates    map[string]chan struct{}
	outcomes map[string]error

	acked   sync.Mutex
	ackedBy map[string]bool // payloads whose publish returned nil
}

func newGatedFake(n int, outcome func(i int) error) *gatedFake {
	f := &gatedFake{shareFake: *newShareFake(), gates: make(map[string]chan struct{}), outcomes: make(map[string]error), ackedBy: make(map[string]bool)}
	for i := range n {
		f.gates[strconv.Itoa(i)] = make(chan struct{})
		f.outcomes[strconv.Itoa(i)] = outcome(i)
	}
	return f
}

func (f *gatedFake) Publish(ctx context.Context, msg gateway.Message) error {
	key := string(msg.Payload)
	f.entered <- msg
	select {
	case <-f.gates[key]:
	case <-ctx.Done():
		f.mu.Lock()
		f.canceled.Add(1)
		f.notifyLocked()
		f.mu.Unlock()
		return ctx.Err()
	}
	err := f.outcomes[key]
	if err == nil {
		f.acked.Lock()
		f.ackedBy[key] = true
		f.acked.Unlock()
	}
	return err
}

// publishAll starts one caller per message i (payload "i") and returns the
// channel of their results.
func publishAll(ctx context.Context, rc *remoteConn, n int) <-chan publishResult {
	results := make(chan publishResult, n)
	for i := range n {
		go func() {
			err := rc.Publish(ctx, gateway.Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: []byte(strconv.Itoa(i)), QoS: 1})
			results <- publishResult{i, err}
		}()
	}
	return results
}

type publishResult struct {
	i   int
	err error
}

// TestSharePipelinedResponsesOutOfOrder: many calls in flight on one socket,
// answered in the reverse order, each with its own outcome: every caller
// gets its own, whatever the order.
func TestSharePipelinedResponsesOutOfOrder(t *testing.T) {
	const n = 600
	outcome := func(i int) error {
		switch i % 3 {
		case 1:
			return fmt.Errorf("%w: device of message %d", gateway.ErrAttachRefused, i)
		case 2:
			return fmt.Errorf("message %d: other failure", i)
		}
		return nil
	}
	fake := newGatedFake(n, outcome)
	rz, _ := serveFake(t, fake, nil)
	rc := dialFake(t, rz)
	ctx := shareCtx(t, 30*time.Second)

	results := publishAll(ctx, rc, n)
	for range n {
		select {
		case <-fake.entered:
		case <-ctx.Done():
			require.FailNow(t, "not every call reached the owner while none was answered")
		}
	}
	for i := n - 1; i >= 0; i-- {
		close(fake.gates[strconv.Itoa(i)])
	}
	for range n {
		r := <-results
		want := outcome(r.i)
		if want == nil {
			require.NoError(t, r.err, "message %d", r.i)
			continue
		}
		require.EqualError(t, r.err, want.Error(), "message %d got another call's outcome", r.i)
		require.Equal(t, errors.Is(want, gateway.ErrAttachRefused), errors.Is(r.err, gateway.ErrAttachRefused))
	}
}

// TestShareOwnerGoneWithCallsInFlight: the owner's socket closes while some
// calls are acknowledged and others still wait for the bridge. Exactly the
// acknowledged ones return nil; every other returns errOwnerGone (the
// shareConn above retries those on the next owner), and the owner's side
// of each of them is canceled, never acknowledged.
func TestShareOwnerGoneWithCallsInFlight(t *testing.T) {
	const n = 300
	fake := newGatedFake(n, func(int) error { return nil })
	rz, srv := serveFake(t, fake, nil)
	rc := dialFake(t, rz)
	// Without a deadline: the owner's side of a call ends only by the
	// caller's cancel or the client's going.
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	results := publishAll(ctx, rc, n)
	for range n {
		<-fake.entered
	}
	acked := make(map[int]bool)
	for i := 0; i < n; i += 2 {
		close(fake.gates[strconv.Itoa(i)])
		acked[i] = true
	}
	got := make(map[int]error, n)
	for len(got) < len(acked) {
		r := <-results
		require.True(t, acked[r.i], "message %d returned (%v) before the owner answered it", r.i, r.err)
		require.NoError(t, r.err)
		got[r.i] = r.err
	}

	// The owner goes, with n/2 calls in flight.
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		srv.closeClients()
	}()

	for len(got) < n {
		r := <-results
		require.False(t, acked[r.i])
		require.ErrorIs(t, r.err, errOwnerGone, "message %d", r.i)
		got[r.i] = r.err
	}
	fake.waitFor(t, shareCtx(t, 10*time.Second), func() bool { return fake.canceled.Load() == int64(n-len(acked)) })
	<-closed
	fake.acked.Lock()
	defer fake.acked.Unlock()
	require.Len(t, fake.ackedBy, len(acked))
	for i := range acked {
		require.True(t, fake.ackedBy[strconv.Itoa(i)])
	}
}

// rawFrame is one frame as read off the socket, header undecoded.
type rawFrame struct {
	header, payload []byte
}

func readRawFrame(t *testing.T, r io.Reader) rawFrame {
	t.Helper()
	f, err := readRaw(r)
	require.NoError(t, err)
	return f
}

func readRaw(r io.Reader) (rawFrame, error) {
	var pre [8]byte
	if _, err := io.ReadFull(r, pre[:]); err != nil {
		return rawFrame{}, err
	}
	total, h := binary.BigEndian.Uint32(pre[0:4]), binary.BigEndian.Uint32(pre[4:8])
	buf := make([]byte, total-4)
	if _, err := io.ReadFull(r, buf); err != nil {
		return rawFrame{}, err
	}
	return rawFrame{header: buf[:h], payload: buf[h:]}, nil
}

func (f rawFrame) json(t *testing.T) wireHeader {
	t.Helper()
	require.Equal(t, byte('{'), f.header[0], "a JSON header: the peer speaks version 2, which reads nothing else")
	var h wireHeader
	require.NoError(t, json.Unmarshal(f.header, &h))
	return h
}

// serveOldOwner stands in for an owner of version 2, which reads JSON
// headers only: it refuses a hello of another version naming its own, as
// that release does, and on a hello of 2 answers one publish. It sends the
// test every header it read, or an error for one that is not JSON.
func serveOldOwner(t *testing.T) (*rendezvous, <-chan wireHeader, <-chan error) {
	t.Helper()
	rz, err := newRendezvous(shareDir(t), "old-owner")
	require.NoError(t, err)
	ln, err := net.Listen("unix", rz.sock)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	got := make(chan wireHeader, 10)
	errs := make(chan error, 10)
	read := func(r io.Reader) (wireHeader, error) {
		var h wireHeader
		f, err := readRaw(r)
		if err != nil {
			return h, err
		}
		if f.header[0] != '{' {
			return h, fmt.Errorf("a header the owner of version 2 cannot read: % x", f.header)
		}
		return h, json.Unmarshal(f.header, &h)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br, bw := bufio.NewReader(c), bufio.NewWriter(c)
				hello, err := read(br)
				if err != nil {
					errs <- err
					return
				}
				got <- hello
				resp := &frame{wireHeader: wireHeader{Op: opResponse, ID: hello.ID, Version: 2, Gateway: "fake-gw", PID: 1}}
				if hello.Version != 2 {
					resp.Code, resp.Error = codeProtocol, fmt.Sprintf("protocol version %d, this owner speaks 2", hello.Version)
				}
				if err := writeJSONFrame(bw, resp); err != nil || resp.Code != "" {
					return
				}
				req, err := read(br)
				if err != nil {
					errs <- err
					return
				}
				got <- req
				_ = writeJSONFrame(bw, respond(req.ID, nil))
				_, _ = io.Copy(io.Discard, br)
			}()
		}
	}()
	return rz, got, errs
}

// rawHello dials rz as a client that speaks the protocol by hand and says
// hello in version; it returns the owner's answer.
func rawHello(t *testing.T, rz *rendezvous, version int) (net.Conn, *bufio.Reader, *bufio.Writer, wireHeader) {
	t.Helper()
	c, err := net.Dial("unix", rz.sock)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	br, bw := bufio.NewReader(c), bufio.NewWriter(c)
	require.NoError(t, writeJSONFrame(bw, &frame{wireHeader: wireHeader{Op: opHello, ID: 1, Version: version, Key: rz.name}}))
	return c, br, bw, readRawFrame(t, br).json(t)
}

func TestShareProtocolVersions(t *testing.T) {
	ctx := shareCtx(t, 20*time.Second)
	msg := gateway.Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: []byte("p"), QoS: 1}

	t.Run("this client and an owner of version 2 agree on 2", func(t *testing.T) {
		rz, got, errs := serveOldOwner(t)
		rc, err := dialOwner(ctx, rz, nil, nil, "")
		require.NoError(t, err)
		defer rc.fail(gateway.ErrClosed)
		require.Equal(t, shareProtoVersion, (<-got).Version, "the first hello offers the newest version")
		require.Equal(t, 2, (<-got).Version, "the second says hello in the owner's")
		require.NoError(t, rc.Publish(ctx, msg))
		select {
		case req := <-got:
			require.Equal(t, opPublish, req.Op)
			require.Equal(t, "dev-1", req.Device)
		case err := <-errs:
			require.NoError(t, err)
		}
	})

	t.Run("a client of version 2 and this owner agree on 2", func(t *testing.T) {
		fake := newShareFake()
		rz, _ := serveFake(t, fake, nil)
		_, br, bw, resp := rawHello(t, rz, 2)
		require.Empty(t, resp.Code, resp.Error)
		require.Equal(t, 2, resp.Version)
		require.NoError(t, writeJSONFrame(bw, &frame{wireHeader: wireHeader{Op: opPublish, ID: 2, Device: "dev-1", Kind: omnicore.KindEvents, QoS: 1}, Payload: []byte("p")}))
		// Every frame the owner sends is JSON: its first ping, then the
		// response.
		for {
			h := readRawFrame(t, br).json(t)
			if h.Op == opResponse {
				require.Equal(t, uint64(2), h.ID)
				require.Empty(t, h.Code)
				break
			}
			require.Equal(t, opPing, h.Op)
		}
		fake.mu.Lock()
		require.Len(t, fake.published, 1)
		fake.mu.Unlock()
	})

	t.Run("this client and owner speak version 3, compact headers", func(t *testing.T) {
		fake := newShareFake()
		rz, _ := serveFake(t, fake, nil)
		_, br, bw, resp := rawHello(t, rz, shareProtoVersion)
		require.Empty(t, resp.Code, resp.Error)
		require.Equal(t, shareProtoVersion, resp.Version)
		fw := newFrameWriter(bw, shareProtoVersion)
		require.NoError(t, fw.write(&frame{wireHeader: wireHeader{Op: opPublish, ID: 2, Device: "dev-1", Kind: omnicore.KindEvents, QoS: 1}, Payload: []byte("p")}))
		require.NoError(t, bw.Flush())
		for {
			f := readRawFrame(t, br)
			require.NotEqual(t, byte('{'), f.header[0], "a compact header")
			var h wireHeader
			require.NoError(t, decodeCompact(f.header, &h))
			if h.Op == opResponse {
				require.Equal(t, uint64(2), h.ID)
				break
			}
		}
	})

	refusals := []struct {
		name    string
		version int
		want    string
	}{
		{"a client of version 1 is refused", 1, "protocol version 1, this owner speaks 2 to 3"},
		{"a client of a newer version is told this owner's", shareProtoVersion + 1, "protocol version 4, this owner speaks 2 to 3"},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			rz, _ := serveFake(t, newShareFake(), nil)
			_, err := dialVersion(ctx, rz, nil, nil, "", tt.version)
			require.ErrorContains(t, err, tt.want)
			var older *olderOwnerError
			require.Equal(t, tt.version > shareProtoVersion, errors.As(err, &older))
			if older != nil {
				require.Equal(t, shareProtoVersion, older.version)
			}
		})
	}
}

// TestShareDuplicatePendingIDClosesTheConnection: a request whose ID is
// still pending breaks the protocol (its answer could not be told from the
// first's): the owner disconnects the client and cancels its pending calls.
func TestShareDuplicatePendingIDClosesTheConnection(t *testing.T) {
	fake := newShareFake()
	fake.gate = make(chan struct{})
	defer close(fake.gate)
	rz, _ := serveFake(t, fake, nil)
	ctx := shareCtx(t, 10*time.Second)
	c, br, bw, resp := rawHello(t, rz, shareProtoVersion)
	require.Empty(t, resp.Code)
	fw := newFrameWriter(bw, shareProtoVersion)
	publish := &frame{wireHeader: wireHeader{Op: opPublish, ID: 5, Device: "dev-1", Kind: omnicore.KindEvents, QoS: 1}, Payload: []byte("p")}
	require.NoError(t, fw.write(publish))
	require.NoError(t, bw.Flush())
	<-fake.entered
	require.NoError(t, fw.write(publish))
	require.NoError(t, bw.Flush())
	// Well before the owner would let a silent client go (30 s).
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	for {
		f, err := readRaw(br)
		if err != nil {
			require.ErrorIs(t, err, io.EOF, "the owner closed the connection")
			break
		}
		var h wireHeader
		require.NoError(t, decodeCompact(f.header, &h))
		require.Equal(t, opPing, h.Op, "no answer to either request")
	}
	fake.waitFor(t, ctx, func() bool { return fake.canceled.Load() == 1 })
	fake.mu.Lock()
	defer fake.mu.Unlock()
	require.Empty(t, fake.published)
}
