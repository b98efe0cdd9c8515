package omnicore

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Algorithms the bridge accepts for JWTs.
const (
	RS256 = "RS256"
	ES256 = "ES256"
)

// Signer mints the JWTs that serve as MQTT passwords (gateway) and attach
// authorizations (devices). The key is read once from its PEM file.
type Signer struct {
	alg string
	key crypto.Signer
}

// LoadSigner reads a PEM private key (PKCS#1, PKCS#8 or SEC 1) for alg.
// Errors never include key material.
func LoadSigner(path, alg string) (*Signer, error) {
	pemBytes, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading private key: %w", err)
	}
	return ParseSigner(pemBytes, alg)
}

// ParseSigner is LoadSigner for PEM bytes already in memory.
func ParseSigner(pemBytes []byte, alg string) (*Signer, error) {
	if alg == RS256 || alg == ES256 {
		// Say what the file is when it is not the key alg needs, instead
		// of the parser's ASN.1 detail.
		if err := checkKeyKind(pemBytes, alg); err != nil {
			return nil, err
		}
	}
	switch alg {
	case RS256:
		k, err := jwt.ParseRSAPrivateKeyFromPEM(pemBytes)
		if err != nil {
			return nil, fmt.Errorf("private key is not an RSA key in PEM for %s: %w", alg, err)
		}
		return &Signer{alg: alg, key: k}, nil
	case ES256:
		k, err := jwt.ParseECPrivateKeyFromPEM(pemBytes)
		if err != nil {
			return nil, fmt.Errorf("private key is not an EC key in PEM for %s: %w", alg, err)
		}
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("ES256 needs a P-256 key, got %s", k.Curve.Params().Name)
		}
		return &Signer{alg: alg, key: k}, nil
	default:
		return nil, fmt.Errorf("algorithm %q is not supported; use %q or %q", alg, RS256, ES256)
	}
}

// Algorithm returns RS256 or ES256.
func (s *Signer) Algorithm() string { return s.alg }

// PublicKeyID identifies the key pair without revealing it: the first 8
// bytes of the SHA-256 of the public key (PKIX DER), in hex. Two plugin
// files naming the same key in different files or encodings get the same ID.
func (s *Signer) PublicKeyID() string {
	der, err := x509.MarshalPKIXPublicKey(s.key.Public())
	if err != nil {
		return "unknown"
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:8])
}

// Token mints a JWT with iat = now, exp = now + lifetime and aud = audience
// (the subscription ID). golang-jwt emits unpadded base64url as OmniCore demands.
func (s *Signer) Token(audience string, now time.Time, lifetime time.Duration) (string, error) {
	// aud as a plain string, the form KORE's SDK sends.
	claims := jwt.MapClaims{"iat": now.Unix(), "exp": now.Add(lifetime).Unix(), "aud": audience}
	var method jwt.SigningMethod = jwt.SigningMethodRS256
	if s.alg == ES256 {
		method = jwt.SigningMethodES256
	}
	tok := jwt.NewWithClaims(method, claims)
	return tok.SignedString(s.key)
}

// TokenClaims is what the bridge reads from a verified JWT.
type TokenClaims struct {
	Algorithm string
	IssuedAt  time.Time
	ExpiresAt time.Time
}

// Verification errors, so that callers (the emulator) can count and log them.
var (
	ErrTokenPadded    = errors.New("JWT uses padded base64")
	ErrTokenAlgorithm = errors.New("JWT algorithm is not RS256 or ES256")
	ErrTokenAudience  = errors.New("JWT audience is not the subscription ID")
	ErrTokenTime      = errors.New("JWT iat/exp out of range")
	ErrTokenSignature = errors.New("JWT signature does not match any key of the device")
)

// VerifyToken checks a JWT as the bridge does: unpadded base64url, RS256 or ES256
// signed by one of keys, aud = audience, iat within skew of now, exp after now
// (minus skew) and exp - iat at most maxLifetime.
func VerifyToken(token, audience string, keys []crypto.PublicKey, now time.Time, skew, maxLifetime time.Duration) (TokenClaims, error) {
	if strings.Contains(token, "=") {
		return TokenClaims{}, ErrTokenPadded
	}
	var lastErr error = ErrTokenSignature
	for _, key := range keys {
		claims := &jwt.RegisteredClaims{}
		parsed, err := jwt.ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) {
			switch key.(type) {
			case *rsa.PublicKey:
				if t.Method.Alg() != RS256 {
					return nil, ErrTokenAlgorithm
				}
			case *ecdsa.PublicKey:
				if t.Method.Alg() != ES256 {
					return nil, ErrTokenAlgorithm
				}
			default:
				return nil, ErrTokenAlgorithm
			}
			return key, nil
		}, jwt.WithValidMethods([]string{RS256, ES256}), jwt.WithoutClaimsValidation())
		if err != nil {
			if errors.Is(err, ErrTokenAlgorithm) || errors.Is(err, jwt.ErrTokenSignatureInvalid) {
				lastErr = ErrTokenSignature
				if errors.Is(err, ErrTokenAlgorithm) {
					lastErr = ErrTokenAlgorithm
				}
				continue
			}
			if errors.Is(err, jwt.ErrTokenUnverifiable) || errors.Is(err, jwt.ErrTokenMalformed) {
				return TokenClaims{}, fmt.Errorf("malformed JWT: %w", err)
			}
			lastErr = err
			continue
		}
		aud, _ := claims.GetAudience()
		if len(aud) != 1 || aud[0] != audience {
			return TokenClaims{}, ErrTokenAudience
		}
		if claims.IssuedAt == nil || claims.ExpiresAt == nil {
			return TokenClaims{}, fmt.Errorf("%w: iat and exp are required", ErrTokenTime)
		}
		iat, exp := claims.IssuedAt.Time, claims.ExpiresAt.Time
		switch {
		case iat.After(now.Add(skew)):
			return TokenClaims{}, fmt.Errorf("%w: iat is in the future by more than %s", ErrTokenTime, skew)
		case !exp.After(now.Add(-skew)):
			return TokenClaims{}, fmt.Errorf("%w: token expired", ErrTokenTime)
		case exp.Sub(iat) > maxLifetime:
			return TokenClaims{}, fmt.Errorf("%w: lifetime %s exceeds %s", ErrTokenTime, exp.Sub(iat), maxLifetime)
		}
		return TokenClaims{Algorithm: parsed.Method.Alg(), IssuedAt: iat, ExpiresAt: exp}, nil
	}
	return TokenClaims{}, lastErr
}

// ParsePublicKey reads a PEM public key or certificate for alg, as registered
// for a device.
func ParsePublicKey(pemBytes []byte, alg string) (crypto.PublicKey, error) {
	switch alg {
	case RS256:
		return jwt.ParseRSAPublicKeyFromPEM(pemBytes)
	case ES256:
		return jwt.ParseECPublicKeyFromPEM(pemBytes)
	default:
		return nil, fmt.Errorf("algorithm %q is not supported; use %q or %q", alg, RS256, ES256)
	}
}
