package emulator_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// TestCredentialFormats: each of KORE's key formats takes the PEM block it
// names, for the algorithm it names, and nothing else.
func TestCredentialFormats(t *testing.T) {
	t.Parallel()
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	pubPEM := func(pub crypto.PublicKey) []byte {
		der, err := x509.MarshalPKIXPublicKey(pub)
		require.NoError(t, err)
		return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	}
	cert := func(pub crypto.PublicKey, priv crypto.Signer) []byte {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dev"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
		require.NoError(t, err)
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	rsaPub, ecPub := pubPEM(&rsaKey.PublicKey), pubPEM(&ecKey.PublicKey)
	rsaPKCS1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&rsaKey.PublicKey)})
	rsaCert, ecCert := cert(&rsaKey.PublicKey, rsaKey), cert(&ecKey.PublicKey, ecKey)

	tests := []struct {
		name    string
		key     emulator.PublicKey
		wantErr string
	}{
		{"RSA_PEM", emulator.PublicKey{Format: "RSA_PEM", PEM: rsaPub}, ""},
		{"RSA_PEM, PKCS#1", emulator.PublicKey{Format: "RSA_PEM", PEM: rsaPKCS1}, ""},
		{"ES256_PEM", emulator.PublicKey{Format: "ES256_PEM", PEM: ecPub}, ""},
		{"RSA_X509_PEM", emulator.PublicKey{Format: "RSA_X509_PEM", PEM: rsaCert}, ""},
		{"ES256_X509_PEM", emulator.PublicKey{Format: "ES256_X509_PEM", PEM: ecCert}, ""},
		{"format from the algorithm", emulator.PublicKey{Algorithm: omnicore.ES256, PEM: ecCert}, ""},
		{"ES256_PEM with an RSA key", emulator.PublicKey{Format: "ES256_PEM", PEM: rsaPub}, "public key 1"},
		{"RSA_PEM with a certificate", emulator.PublicKey{Format: "RSA_PEM", PEM: rsaCert}, "needs a PUBLIC KEY PEM block"},
		{"RSA_X509_PEM with a bare key", emulator.PublicKey{Format: "RSA_X509_PEM", PEM: rsaPub}, "needs a CERTIFICATE PEM block"},
		{"format and algorithm disagree", emulator.PublicKey{Format: "RSA_PEM", Algorithm: omnicore.ES256, PEM: rsaPub}, "is for RS256"},
		{"unknown format", emulator.PublicKey{Format: "ES384_PEM", PEM: ecPub}, "format"},
		{"neither format nor algorithm", emulator.PublicKey{PEM: ecPub}, "algorithm"},
		{"not PEM", emulator.PublicKey{Format: "ES256_PEM", PEM: []byte("nope")}, "not a PEM block"},
	}
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	require.NoError(t, srv.AddRegistry("reg"))
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := srv.CreateDevice("reg", emulator.DeviceSpec{Device: emulator.Device{ID: fmt.Sprintf("dev-%d", i), PublicKeys: []emulator.PublicKey{tc.key}}})
			if tc.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.wantErr)
		})
	}
	four := []emulator.PublicKey{{Format: "ES256_PEM", PEM: ecPub}, {Format: "ES256_PEM", PEM: ecPub}, {Format: "ES256_PEM", PEM: ecPub}, {Format: "ES256_PEM", PEM: ecPub}}
	require.ErrorContains(t, srv.CreateDevice("reg", emulator.DeviceSpec{Device: emulator.Device{ID: "four", PublicKeys: four}}), "allows 3")
}

// TestStateFileErrors: a state directory the emulator cannot read stops it
// with the file named, rather than starting empty.
func TestStateFileErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, content, wantErr string }{
		{"not JSON", `{"format":`, "provisioning.json"},
		{"another format", `{"format":99,"subscription":"test-sub"}`, "format 99"},
		{"a bad key", `{"format":1,"subscription":"test-sub","registries":[{"id":"reg","devices":[{"id":"d","keys":[{"format":"ES256_PEM","pem":"junk"}]}]}]}`, "not a PEM block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			require.NoError(t, os.WriteFile(filepath.Join(dir, emulator.ProvisioningFile), []byte(tc.content), 0o600))
			_, err := emulator.Start(emulator.WithStateDir(dir))
			require.ErrorContains(t, err, tc.wantErr)
		})
	}
}
