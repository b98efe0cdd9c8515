package main

import (
	"os"
	"os/user"
	"path/filepath"
	"strconv"

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
	certPEM, keyPEM, err := emulator.IssueServerCertificate(caCert, caKey, []string{"127.0.0.1", "::1", "localhost"})
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
