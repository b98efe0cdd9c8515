package emulator

import (
	"errors"
	"os"
	"testing"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// NewDeviceKey writes a fresh key pair for alg (RS256 or ES256) to
// dir/name.key and dir/name.pub and returns the private key path and the
// public key to register. ES256 keys are much faster to generate.
func NewDeviceKey(t testing.TB, dir, name, alg string) (privatePath string, pub PublicKey) {
	t.Helper()
	privatePath, publicPath, err := omnicore.WriteKeyPair(dir, name, alg)
	if err != nil {
		t.Fatalf("emulator: key pair for %s: %v", name, err)
	}
	pem, err := os.ReadFile(publicPath)
	if err != nil {
		t.Fatalf("emulator: %v", err)
	}
	return privatePath, PublicKey{Algorithm: alg, PEM: pem}
}

// AddTestGateway registers an ASSOCIATION_ONLY gateway with a fresh key of
// alg (in t.TempDir()), creating the registry if needed, plus devices bound
// to it. It returns the gateway's private key path.
func (s *Server) AddTestGateway(t testing.TB, registryID, gatewayID, alg string, devices ...string) string {
	t.Helper()
	if err := s.AddRegistry(registryID); err != nil && !errors.Is(err, ErrExists) {
		t.Fatalf("emulator: %v", err)
	}
	key, pub := NewDeviceKey(t, t.TempDir(), gatewayID, alg)
	if err := s.AddDevice(registryID, Device{ID: gatewayID, Gateway: true, AuthMethod: AssociationOnly, PublicKeys: []PublicKey{pub}}); err != nil {
		t.Fatalf("emulator: %v", err)
	}
	for _, d := range devices {
		if err := s.AddDevice(registryID, Device{ID: d}); err != nil && !errors.Is(err, ErrExists) {
			t.Fatalf("emulator: %v", err)
		}
		if err := s.Bind(registryID, gatewayID, d); err != nil {
			t.Fatalf("emulator: %v", err)
		}
	}
	return key
}

// Token mints a JWT for this server's subscription with the key at
// privateKeyPath, issued now.
func (s *Server) Token(t testing.TB, privateKeyPath, alg string, lifetime time.Duration) string {
	t.Helper()
	signer, err := omnicore.LoadSigner(privateKeyPath, alg)
	if err != nil {
		t.Fatalf("emulator: %v", err)
	}
	tok, err := signer.Token(s.subscription, time.Now(), lifetime)
	if err != nil {
		t.Fatalf("emulator: %v", err)
	}
	return tok
}
