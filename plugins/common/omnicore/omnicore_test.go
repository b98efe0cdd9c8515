package omnicore

import (
	"crypto"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestValidateID(t *testing.T) {
	tests := []struct {
		name string
		id   string
		ok   bool
	}{
		{"simple", "sensor-01", true},
		{"all allowed characters", "a-._~%9Z", true},
		{"max length", "a" + strings.Repeat("b", MaxIDLength-1), true},
		{"empty", "", false},
		{"slash", "a/b", false},
		{"plus wildcard", "a+b", false},
		{"hash wildcard", "a#b", false},
		{"dot dot", "..", false},
		{"dot dot inside", "a..b", false},
		{"starts with digit", "1abc", false},
		{"starts with dash", "-abc", false},
		{"space", "a b", false},
		{"too long", "a" + strings.Repeat("b", MaxIDLength), false},
		{"invalid utf-8", "a\xff", false},
		{"non-ascii letter", "aé", false},
		{"nul", "a\x00", false},
		{"dollar", "$SYS", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateID(tt.id)
			if tt.ok {
				require.NoError(t, err)
			} else {
				require.Error(t, err)
			}
		})
	}
}

func TestValidateSubfolder(t *testing.T) {
	tests := []struct {
		sub string
		ok  bool
	}{
		{"alerts", true},
		{"a/b/c", true},
		{"temp-1.x", true},
		{"", false},
		{"a//b", false},
		{"/a", false},
		{"a/", false},
		{"a/+/b", false},
		{"#", false},
		{"a/../b", false},
		{"..", false},
		{"a\x00b", false},
		{"a\nb", false},
		{"\xff", false},
		{strings.Repeat("a", MaxSubfolderLength+1), false},
	}
	for _, tt := range tests {
		t.Run(tt.sub, func(t *testing.T) {
			err := ValidateSubfolder(tt.sub)
			if tt.ok {
				require.NoError(t, err)
			} else {
				require.Error(t, err)
			}
		})
	}
}

func TestTopicRoundTrip(t *testing.T) {
	tests := []struct {
		kind Kind
		sub  string
		want string
	}{
		{KindEvents, "", "/reg/dev/events"},
		{KindEvents, "a/b", "/reg/dev/events/a/b"},
		{KindState, "", "/reg/dev/state"},
		{KindCommands, "#", "/reg/dev/commands/#"},
		{KindErrors, "", "/reg/dev/errors"},
	}
	for _, tt := range tests {
		got := Topic("reg", "dev", tt.kind, tt.sub)
		require.Equal(t, tt.want, got)
		p, err := ParseTopic(got)
		require.NoError(t, err)
		require.Equal(t, ParsedTopic{Registry: "reg", Device: "dev", Kind: tt.kind, Subfolder: tt.sub}, p)
	}
	for _, bad := range []string{"reg/dev/events", "/reg/dev", "//dev/events", "/reg//events", "/", "/reg/dev/events/"} {
		_, err := ParseTopic(bad)
		require.Error(t, err, bad)
	}
}

func TestClientID(t *testing.T) {
	id := ClientID("sub", "reg", "gw")
	require.Equal(t, "subscriptions/sub/registries/reg/devices/gw", id)
	s, r, d, err := ParseClientID(id)
	require.NoError(t, err)
	require.Equal(t, []string{"sub", "reg", "gw"}, []string{s, r, d})
	for _, bad := range []string{"", "projects/p/locations/l/registries/r/devices/d", "subscriptions/s/registries/r/devices/", "subscriptions/s/registries/r/devices/d/x"} {
		_, _, _, err := ParseClientID(bad)
		require.Error(t, err, bad)
	}
}

func TestTokenSignAndVerify(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for _, alg := range []string{RS256, ES256} {
		t.Run(alg, func(t *testing.T) {
			priv, pub, err := GenerateKeyPEM(alg)
			require.NoError(t, err)
			signer, err := ParseSigner(priv, alg)
			require.NoError(t, err)
			key, err := ParsePublicKey(pub, alg)
			require.NoError(t, err)
			_, otherPub, err := GenerateKeyPEM(alg)
			require.NoError(t, err)
			otherKey, err := ParsePublicKey(otherPub, alg)
			require.NoError(t, err)

			tok, err := signer.Token("sub", now, time.Hour)
			require.NoError(t, err)
			require.NotContains(t, tok, "=", "OmniCore rejects padded base64")
			require.Len(t, strings.Split(tok, "."), 3)

			claims, err := VerifyToken(tok, "sub", []cryptoKey{key}, now, ClockSkew, MaxTokenLifetime)
			require.NoError(t, err)
			require.Equal(t, alg, claims.Algorithm)
			require.Equal(t, now.Add(time.Hour), claims.ExpiresAt)

			cases := []struct {
				name   string
				token  string
				aud    string
				keys   []cryptoKey
				now    time.Time
				target error
			}{
				{"wrong audience", tok, "other", []cryptoKey{key}, now, ErrTokenAudience},
				{"wrong key", tok, "sub", []cryptoKey{otherKey}, now, ErrTokenSignature},
				{"expired", tok, "sub", []cryptoKey{key}, now.Add(time.Hour + ClockSkew + time.Second), ErrTokenTime},
				{"issued in the future", tok, "sub", []cryptoKey{key}, now.Add(-ClockSkew - time.Second), ErrTokenTime},
				{"padded", tok + "=", "sub", []cryptoKey{key}, now, ErrTokenPadded},
			}
			for _, c := range cases {
				_, err := VerifyToken(c.token, c.aud, c.keys, c.now, ClockSkew, MaxTokenLifetime)
				require.ErrorIs(t, err, c.target, c.name)
			}

			long, err := signer.Token("sub", now, 25*time.Hour)
			require.NoError(t, err)
			_, err = VerifyToken(long, "sub", []cryptoKey{key}, now, ClockSkew, MaxTokenLifetime)
			require.ErrorIs(t, err, ErrTokenTime)

			_, err = VerifyToken("not.a.jwt", "sub", []cryptoKey{key}, now, ClockSkew, MaxTokenLifetime)
			require.Error(t, err)
		})
	}
}

func TestSignerRejectsWrongKeyType(t *testing.T) {
	rsaPriv, _, err := GenerateKeyPEM(RS256)
	require.NoError(t, err)
	_, err = ParseSigner(rsaPriv, ES256)
	require.Error(t, err)
	_, err = ParseSigner(rsaPriv, "HS256")
	require.Error(t, err)
	_, err = ParseSigner([]byte("garbage"), RS256)
	require.Error(t, err)
	require.NotContains(t, err.Error(), "garbage")
}

type cryptoKey = crypto.PublicKey
