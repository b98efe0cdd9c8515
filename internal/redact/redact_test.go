package redact

import (
	"errors"
	"fmt"
	"strconv"
	"testing"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/parsers/influx"
	jsonparser "github.com/influxdata/telegraf/plugins/parsers/json"
	"github.com/influxdata/telegraf/plugins/parsers/value"
	"github.com/stretchr/testify/require"
)

const secret = "hunter2-Wifi-Key"

type parser interface {
	Parse([]byte) ([]telegraf.Metric, error)
}

// TestErrorFromRealParsers feeds payloads holding a secret to Telegraf's
// parsers and checks that what Error makes of the parse error never holds
// the secret, nor any 6-byte run of the payload, and keeps what helps
// (line and column, the kind of problem).
func TestErrorFromRealParsers(t *testing.T) {
	t.Parallel()
	influxParser := func() (parser, error) {
		p := &influx.Parser{}
		return p, p.Init()
	}
	tests := []struct {
		name      string
		newParser func() (parser, error)
		payload   string
		quoted    string // what the parser's error quotes of the payload
		wantKeep  string // a piece of the error text that must survive
	}{
		{name: "influx line", newParser: influxParser, payload: "wifi_psk=" + secret, quoted: secret, wantKeep: "at 1:"},
		{name: "influx, a second bad line", newParser: influxParser, payload: "cfg value=1\nwifi psk=\"" + secret + "\" x", quoted: secret, wantKeep: "at 2:"},
		{name: "json", newParser: func() (parser, error) {
			p := &jsonparser.Parser{MetricName: "m"}
			return p, p.Init()
		}, payload: `{"wifi_psk":` + secret + `}`, quoted: "'h'", wantKeep: "invalid character"},
		{name: "value float", newParser: func() (parser, error) {
			p := &value.Parser{DataType: "float", MetricName: "m"}
			return p, p.Init()
		}, payload: secret, quoted: secret, wantKeep: "invalid syntax"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := tc.newParser()
			require.NoError(t, err)
			_, perr := p.Parse([]byte(tc.payload))
			require.Error(t, perr)
			require.Contains(t, perr.Error(), tc.quoted, "the parser's own text quotes the payload (else this case tests nothing)")
			got := Error(perr, []byte(tc.payload))
			require.NotContains(t, got, tc.quoted)
			require.NotContains(t, got, secret[:6])
			require.False(t, sharesRun(got, []byte(tc.payload)), "no 6-byte run of the payload in %q", got)
			require.Contains(t, got, tc.wantKeep)
		})
	}
}

func TestQuoted(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		`plain text`:                       `plain text`,
		`bad "secret" here`:                `bad "…" here`,
		`escaped "a \" quote" after`:       `escaped "…" after`,
		`char 'w' then`:                    `char '…' then`,
		"raw `x` then":                     "raw `…` then",
		`unterminated "runs to the end`:    `unterminated "…`,
		`two "a" and "b"`:                  `two "…" and "…"`,
		`trailing backslash "a\`:           `trailing backslash "…`,
		`empty "" quotes`:                  `empty "…" quotes`,
		`metric parse error: at 1:12: "x"`: `metric parse error: at 1:12: "…"`,
	} {
		require.Equal(t, want, Quoted(in), in)
	}
}

// TestErrorWithheld: a text that names the payload without quotes is not
// shown at all, only the innermost error's type.
func TestErrorWithheld(t *testing.T) {
	t.Parallel()
	payload := []byte("psk=" + secret)
	base := &strconv.NumError{Func: "ParseFloat", Num: secret, Err: strconv.ErrSyntax}
	err := fmt.Errorf("field psk: value %s: %w", secret, errors.Unwrap(base))
	got := Error(err, payload)
	require.NotContains(t, got, secret[:6])
	require.Contains(t, got, "withheld")
	require.Contains(t, got, "*errors.errorString")

	require.Equal(t, "no payload bytes here", Error(errors.New("no payload bytes here"), payload))
	require.Equal(t, "empty payload", Error(errors.New("empty payload"), nil))
	// A short payload withholds any text holding it.
	require.Contains(t, Error(errors.New("bad value ab1 in field"), []byte("ab1")), "withheld")
}
