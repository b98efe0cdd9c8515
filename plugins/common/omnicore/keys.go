package omnicore

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// checkKeyKind returns an error that points at the fix when pemBytes is not
// a private key of the kind alg needs: a certificate or public key given as
// the key, or a key of the other algorithm. It returns nil when it cannot
// tell (the parser then reports). It never quotes the file's contents.
func checkKeyKind(pemBytes []byte, alg string) error {
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		return errors.New("this file holds no PEM block; private_key must be the path of the gateway's private key in PEM format")
	}
	switch block.Type {
	case "CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CRL", "CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST":
		return fmt.Errorf("this file is a certificate (PEM %q), not a private key; private_key must be the gateway's private key (a CA certificate goes in tls_ca)", block.Type)
	case "PUBLIC KEY", "RSA PUBLIC KEY":
		return errors.New("this file is a public key, not a private key; private_key must be the gateway's private key (the public key is what is registered for the gateway)")
	}
	var kind string // the key's algorithm family
	switch key := parsePrivateKey(block); key.(type) {
	case *rsa.PrivateKey:
		kind = RS256
	case *ecdsa.PrivateKey:
		kind = ES256
	default:
		return nil
	}
	if kind == alg {
		return nil
	}
	if kind == RS256 {
		return fmt.Errorf("the key is RSA: set algorithm = %q (algorithm is %q)", RS256, alg)
	}
	return fmt.Errorf("the key is EC: set algorithm = %q (algorithm is %q)", ES256, alg)
}

// parsePrivateKey parses a PEM block as PKCS#8, PKCS#1 (RSA) or SEC 1 (EC);
// nil when it is none of them.
func parsePrivateKey(block *pem.Block) any {
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		return k
	}
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k
	}
	if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		return k
	}
	return nil
}

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
