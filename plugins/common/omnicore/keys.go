package omnicore

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
)

// GenerateKeyPEM makes a fresh key pair for alg and returns the private key
// (PKCS#8) and the public key (PKIX) as PEM. RSA keys are 2048 bits.
func GenerateKeyPEM(alg string) (privatePEM, publicPEM []byte, err error) {
	var priv any
	switch alg {
	case RS256:
		priv, err = rsa.GenerateKey(rand.Reader, 2048)
	case ES256:
		priv, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		return nil, nil, fmt.Errorf("algorithm %q is not supported; use %q or %q", alg, RS256, ES256)
	}
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, nil, err
	}
	var pub any
	switch k := priv.(type) {
	case *rsa.PrivateKey:
		pub = &k.PublicKey
	case *ecdsa.PrivateKey:
		pub = &k.PublicKey
	}
	pubDER, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), nil
}

// WriteKeyPair generates a key pair for alg and writes it to dir/name.key
// (mode 0600) and dir/name.pub, returning both paths.
func WriteKeyPair(dir, name, alg string) (privatePath, publicPath string, err error) {
	priv, pub, err := GenerateKeyPEM(alg)
	if err != nil {
		return "", "", err
	}
	privatePath = filepath.Join(dir, name+".key")
	publicPath = filepath.Join(dir, name+".pub")
	if err := os.WriteFile(privatePath, priv, 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(publicPath, pub, 0o644); err != nil {
		return "", "", err
	}
	return privatePath, publicPath, nil
}
