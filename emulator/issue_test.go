package emulator_test

import (
	"crypto/tls"
	"crypto/x509"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// A certificate issued for another broker verifies with the CA's file, for
// the hosts it names and no other.
func TestIssueServerCertificate(t *testing.T) {
	caCert, caKey, err := emulator.GenerateCA()
	require.NoError(t, err)
	certPEM, keyPEM, err := emulator.IssueServerCertificate(caCert, caKey, []string{"127.0.0.1", "localhost", "localhost"})
	require.NoError(t, err)
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	require.NoError(t, err)

	roots := x509.NewCertPool()
	require.True(t, roots.AppendCertsFromPEM(caCert))
	for _, tc := range []struct {
		host string
		ok   bool
	}{{"127.0.0.1", true}, {"localhost", true}, {"::1", false}, {"example.com", false}} {
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: tc.host, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		if tc.ok {
			require.NoError(t, err, tc.host)
		} else {
			require.Error(t, err, tc.host)
		}
	}

	_, _, err = emulator.IssueServerCertificate([]byte("not pem"), caKey, nil)
	require.Error(t, err)
	other, _, err := emulator.GenerateCA()
	require.NoError(t, err)
	_, _, err = emulator.IssueServerCertificate(other, caKey, []string{"localhost"})
	require.Error(t, err, "a key that is not the certificate's")
}
