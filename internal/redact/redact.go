// Package redact makes error texts fit for a log line when the error came
// from parsing a payload: payloads can hold secrets (a config with a Wi-Fi
// key, a command with a password), and parsers quote the input they choke
// on (Telegraf's influx parser puts the whole line in its error). Logs say a
// payload's size and kind, never its bytes.
//
// No library does this: it depends on how Go errors quote their input.
package redact

import (
	"errors"
	"fmt"
	"strings"
)

// minRun is the shortest run of payload bytes that withholds an error text
// (see Error): shorter runs are ordinary words and punctuation.
const minRun = 6

// maxText bounds the error text kept: the rest is cut.
const maxText = 512

// Quoted returns s with the content of every quoted segment ("...", '...',
// `...`) replaced by "…": Go errors quote the input they report (%q, or
// 'c' for one character). An unterminated quote runs to the end.
func Quoted(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		q := s[i]
		if q != '"' && q != '\'' && q != '`' {
			b.WriteByte(q)
			continue
		}
		// Find the closing quote, skipping backslash escapes (%q output).
		j := i + 1
		for j < len(s) && s[j] != q {
			if s[j] == '\\' && q != '`' {
				j++
			}
			j++
		}
		b.WriteByte(q)
		b.WriteString("…")
		if j < len(s) {
			b.WriteByte(q)
		}
		i = j
	}
	return b.String()
}

// Error returns err's text for a log line about payload: quoted segments
// redacted (Quoted), cut to a readable length, and withheld altogether (only
// the error's type is given) when it still holds a run of payload bytes.
func Error(err error, payload []byte) string {
	msg := Quoted(err.Error())
	if len(msg) > maxText {
		msg = msg[:maxText] + "..."
	}
	if sharesRun(msg, payload) {
		inner := err
		for u := errors.Unwrap(inner); u != nil; u = errors.Unwrap(inner) {
			inner = u
		}
		return fmt.Sprintf("%T (its text is withheld: it holds payload bytes)", inner)
	}
	return msg
}

// sharesRun reports whether msg and payload have a run of min(minRun,
// len(payload)) bytes in common: the windows of msg (at most maxText+3
// bytes) are put in a set, then the payload is scanned once.
func sharesRun(msg string, payload []byte) bool {
	n := min(minRun, len(payload))
	if n == 0 || len(msg) < n {
		return false
	}
	windows := make(map[string]struct{}, len(msg)-n+1)
	for i := 0; i+n <= len(msg); i++ {
		windows[msg[i:i+n]] = struct{}{}
	}
	for i := 0; i+n <= len(payload); i++ {
		if _, ok := windows[string(payload[i:i+n])]; ok {
			return true
		}
	}
	return false
}
