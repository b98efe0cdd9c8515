// Package wiretap helps tests prove that secrets never leak: a TCP proxy that
// keeps every byte clients send through it, so a test can find the JWTs
// (CONNECT passwords, attach payloads) really put on the wire and check that
// none of them appears in a log, and a check for key material in text.
package wiretap

import (
	"bytes"
	"encoding/base64"
	"encoding/pem"
	"io"
	"net"
	"os"
	"regexp"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// Tap forwards connections on Addr to a target and records client bytes.
type Tap struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	sent bytes.Buffer

	connsMu sync.Mutex
	conns   []net.Conn
}

// New starts a tap on a loopback port in front of target (host:port); it is
// closed when the test ends.
func New(t testing.TB, target string) *Tap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("wiretap: %v", err)
	}
	p := &Tap{ln: ln}
	p.wg.Add(1)
	go p.serve(target)
	t.Cleanup(p.close)
	return p
}

func (p *Tap) serve(target string) {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", target)
		if err != nil {
			c.Close()
			continue
		}
		p.connsMu.Lock()
		p.conns = append(p.conns, c, up)
		p.connsMu.Unlock()
		p.wg.Add(2)
		go func() {
			defer p.wg.Done()
			_, _ = io.Copy(io.MultiWriter(up, recordWriter{p}), c)
			up.Close()
		}()
		go func() {
			defer p.wg.Done()
			_, _ = io.Copy(c, up)
			c.Close()
		}()
	}
}

func (p *Tap) close() {
	p.ln.Close()
	p.connsMu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.connsMu.Unlock()
	p.wg.Wait()
}

type recordWriter struct{ p *Tap }

func (w recordWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.sent.Write(b)
}

// Addr is the host:port clients connect to.
func (p *Tap) Addr() string { return p.ln.Addr().String() }

var jwtPattern = regexp.MustCompile(`eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+`)

// Tokens are the distinct JWTs clients sent, in order of first appearance.
func (p *Tap) Tokens() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for _, tok := range jwtPattern.FindAllString(p.sent.String(), -1) {
		if !seen[tok] {
			seen[tok] = true
			out = append(out, tok)
		}
	}
	return out
}

// RequireNoKeyMaterial fails the test when s holds a PEM marker or any
// 16-character piece of the base64 body of the PEM files at paths.
func RequireNoKeyMaterial(t testing.TB, s string, paths ...string) {
	t.Helper()
	require.NotContains(t, s, "-----BEGIN", "a PEM marker")
	require.NotContains(t, s, "PRIVATE KEY-----", "a PEM marker")
	for _, p := range paths {
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		for rest := b; ; {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			body := base64.StdEncoding.EncodeToString(block.Bytes)
			for i := 0; i+16 <= len(body); i += 16 {
				require.NotContains(t, s, body[i:i+16], "a piece of the key in %s", p)
			}
		}
	}
}
