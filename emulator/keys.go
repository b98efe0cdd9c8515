package emulator

import (
	"crypto"
	"encoding/pem"
	"fmt"
	"strings"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// KORE's public key formats and what each means for the emulator.
var keyFormats = map[string]struct {
	alg  string
	cert bool // an X.509 certificate rather than a bare public key
}{
	"RSA_PEM":        {omnicore.RS256, false},
	"RSA_X509_PEM":   {omnicore.RS256, true},
	"ES256_PEM":      {omnicore.ES256, false},
	"ES256_X509_PEM": {omnicore.ES256, true},
}

// KeyFormat is KORE's format name for a key of alg, as a certificate or not.
func KeyFormat(alg string, cert bool) string {
	f := "RSA"
	if alg == omnicore.ES256 {
		f = "ES256"
	}
	if cert {
		return f + "_X509_PEM"
	}
	return f + "_PEM"
}

// parseKeys checks and parses a device's credentials: at most three, each a
// PEM block of the kind its format names, for the algorithm it names. It
// returns them with Format and Algorithm both filled in.
func parseKeys(deviceID string, in []PublicKey) ([]crypto.PublicKey, []PublicKey, error) {
	if len(in) > maxCredentials {
		return nil, nil, fmt.Errorf("device %q: %d public keys, the bridge allows %d", deviceID, len(in), maxCredentials)
	}
	keys := make([]crypto.PublicKey, 0, len(in))
	out := make([]PublicKey, 0, len(in))
	for i, k := range in {
		k, err := normalizeKey(k)
		if err == nil {
			var key crypto.PublicKey
			if key, err = omnicore.ParsePublicKey(k.PEM, k.Algorithm); err == nil {
				keys = append(keys, key)
				out = append(out, k)
				continue
			}
		}
		return nil, nil, fmt.Errorf("device %q: public key %d: %w", deviceID, i+1, err)
	}
	return keys, out, nil
}

func normalizeKey(k PublicKey) (PublicKey, error) {
	block, _ := pem.Decode(k.PEM)
	if block == nil {
		return k, fmt.Errorf("not a PEM block")
	}
	cert := block.Type == "CERTIFICATE"
	if k.Format == "" {
		if k.Algorithm != omnicore.RS256 && k.Algorithm != omnicore.ES256 {
			return k, fmt.Errorf("algorithm %q is not %s or %s", k.Algorithm, omnicore.RS256, omnicore.ES256)
		}
		k.Format = KeyFormat(k.Algorithm, cert)
	}
	f, ok := keyFormats[k.Format]
	switch {
	case !ok:
		return k, fmt.Errorf("format %s is not RSA_PEM, ES256_PEM, RSA_X509_PEM or ES256_X509_PEM", trunc(k.Format))
	case k.Algorithm == "":
		k.Algorithm = f.alg
	case k.Algorithm != f.alg:
		return k, fmt.Errorf("format %s is for %s, not %s", k.Format, f.alg, k.Algorithm)
	}
	if f.cert != cert {
		want := "a PUBLIC KEY"
		if f.cert {
			want = "a CERTIFICATE"
		}
		return k, fmt.Errorf("format %s needs %s PEM block, not %s", k.Format, want, strings.ToUpper(block.Type))
	}
	return k, nil
}
