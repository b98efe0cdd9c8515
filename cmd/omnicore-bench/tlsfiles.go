package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// benchTLS is the CA of the TLS rows and the files of mosquitto's TLS
// listener: a server certificate from that CA for 127.0.0.1, ::1 and
// localhost. The emulator gets the same CA (emulator.WithCA), so one CA
// file serves every client against either broker.
type benchTLS struct {
	caCertPEM, caKeyPEM []byte
	// dir holds the files; it is readable by the user mosquitto runs as
	// once it drops root (it reads its certificates after that).
	dir                       string
	caFile, certFile, keyFile string
}

func newBenchTLS() (*benchTLS, error) {
	caCert, caKey, err := emulator.GenerateCA()
	if err != nil {
		return nil, err
	}
	certPEM, keyPEM, err := issueServerCert(caCert, caKey, []string{"127.0.0.1", "::1", "localhost"})
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "omnicore-bench-tls-")
	if err != nil {
		return nil, err
	}
	t := &benchTLS{caCertPEM: caCert, caKeyPEM: caKey, dir: dir,
		caFile: filepath.Join(dir, "ca.pem"), certFile: filepath.Join(dir, "server.pem"), keyFile: filepath.Join(dir, "server.key")}
	fail := func(err error) (*benchTLS, error) {
		t.close()
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return fail(err)
	}
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{t.caFile, caCert, 0o644}, {t.certFile, certPEM, 0o644}, {t.keyFile, keyPEM, 0o600}} {
		if err := os.WriteFile(f.path, f.data, f.mode); err != nil {
			return fail(err)
		}
	}
	if os.Geteuid() == 0 {
		// mosquitto started as root drops to "mosquitto", or "nobody"
		// when that user does not exist, before it reads the key.
		for _, name := range []string{"mosquitto", "nobody"} {
			if u, err := user.Lookup(name); err == nil {
				if uid, err := strconv.Atoi(u.Uid); err == nil {
					if err := os.Chown(t.keyFile, uid, -1); err != nil {
						return fail(err)
					}
				}
				break
			}
		}
	}
	return t, nil
}

func (t *benchTLS) close() {
	if t != nil {
		os.RemoveAll(t.dir)
	}
}

// issueServerCert makes a server certificate (ECDSA P-256, PKCS#8 key) for
// hosts, signed by the CA.
func issueServerCert(caCertPEM, caKeyPEM []byte, hosts []string) (certPEM, keyPEM []byte, err error) {
	cb, _ := pem.Decode(caCertPEM)
	kb, _ := pem.Decode(caKeyPEM)
	if cb == nil || kb == nil {
		return nil, nil, errors.New("the CA is not PEM")
	}
	ca, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	caKey, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, errors.New("the CA key cannot sign")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "omnicore-bench mosquitto"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(0, 0, 7),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}
