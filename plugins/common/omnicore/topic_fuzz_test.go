package omnicore

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// Fuzz targets for the identifier and topic rules: whatever a metric's tags
// hold, an ID the rules accept can only ever become a topic of its own device.
// The seeds (below and in testdata/fuzz) run in every "go test"; "make fuzz"
// explores further.

// fuzzKinds are the kinds a topic can have; the fuzzer picks one by index.
var fuzzKinds = []Kind{KindEvents, KindState, KindConfig, KindCommands, KindAttach, KindDetach, KindErrors}

// hostileIDs are device tags to try: wildcards, separators, path tricks,
// control bytes, lengths, and a few valid ones.
var hostileIDs = []string{
	"", "/", "a/b", "+", "a+b", "#", "a#", "..", "a..b", "../x", ".", "a/../b",
	strings.Repeat("a", 300), strings.Repeat("a", MaxIDLength), "a\xff", "\xff", "a\x00b", "a b",
	"a\nb", "$SYS", "%", "a%2Fb", "é", "a\u202e", "A-._~%9", "dev-01",
}

func FuzzTopic(f *testing.F) {
	for i, id := range hostileIDs {
		f.Add("reg", id, uint8(i), "")
		f.Add(id, "dev", uint8(i), "a/b")
		f.Add("reg", "dev", uint8(i), id)
	}
	f.Add("my-registry", "sensor-01", uint8(0), "health/battery")
	f.Add("r", "d", uint8(3), "a//b")
	f.Add("r", "d", uint8(0), "a/+/b")
	f.Add("r", "d", uint8(0), "a/#")
	f.Add("r", "d", uint8(0), "/a")
	f.Add("r", "d", uint8(0), "a/")
	f.Add("r", "d", uint8(0), "a\x7fb")
	f.Fuzz(func(t *testing.T, registry, device string, k uint8, subfolder string) {
		kind := fuzzKinds[int(k)%len(fuzzKinds)]
		regOK := ValidateID(registry) == nil
		devOK := ValidateID(device) == nil
		for _, id := range []struct {
			id string
			ok bool
		}{{registry, regOK}, {device, devOK}} {
			if id.ok {
				checkAcceptedID(t, id.id)
			}
		}
		subOK := subfolder == "" || ValidateSubfolder(subfolder) == nil
		if subfolder != "" && subOK {
			checkAcceptedSubfolder(t, subfolder)
		}
		if !regOK || !devOK || !subOK {
			return
		}
		// Only events and commands carry subfolders.
		if kind != KindEvents && kind != KindCommands {
			subfolder = ""
		}
		topic := Topic(registry, device, kind, subfolder)
		if !utf8.ValidString(topic) {
			t.Fatalf("topic %q is not valid UTF-8", topic)
		}
		if strings.ContainsAny(topic, "+#") {
			t.Fatalf("topic %q holds an MQTT wildcard", topic)
		}
		prefix := "/" + registry + "/" + device + "/"
		if !strings.HasPrefix(topic, prefix) {
			t.Fatalf("topic %q is outside %q", topic, prefix)
		}
		for i, level := range strings.Split(topic[1:], "/") {
			if level == "" || level == "." || level == ".." {
				t.Fatalf("topic %q has level %d %q", topic, i+1, level)
			}
		}
		for _, r := range topic {
			if r < 0x20 || r == 0x7f {
				t.Fatalf("topic %q holds control character %q", topic, r)
			}
		}
		p, err := ParseTopic(topic)
		if err != nil {
			t.Fatalf("ParseTopic(%q): %v", topic, err)
		}
		want := ParsedTopic{Registry: registry, Device: device, Kind: kind, Subfolder: subfolder}
		if p != want {
			t.Fatalf("ParseTopic(%q) = %+v, want %+v", topic, p, want)
		}
		// The client ID of an accepted gateway round-trips too.
		sub, reg, dev, err := ParseClientID(ClientID("sub", registry, device))
		if err != nil || sub != "sub" || reg != registry || dev != device {
			t.Fatalf("client ID of %q/%q: %q %q %q %v", registry, device, sub, reg, dev, err)
		}
	})
}

// checkAcceptedID is the contract of ValidateID, restated independently.
func checkAcceptedID(t *testing.T, id string) {
	t.Helper()
	switch {
	case id == "" || len(id) > MaxIDLength:
		t.Fatalf("accepted ID of %d bytes", len(id))
	case !utf8.ValidString(id):
		t.Fatalf("accepted invalid UTF-8 ID %q", id)
	case strings.Contains(id, ".."):
		t.Fatalf("accepted ID %q with ..", id)
	case !(id[0] >= 'a' && id[0] <= 'z' || id[0] >= 'A' && id[0] <= 'Z'):
		t.Fatalf("accepted ID %q not starting with a letter", id)
	}
	for _, r := range id {
		if r > 0x7e || r <= 0x20 || strings.ContainsRune("/+#$", r) {
			t.Fatalf("accepted ID %q holding %q", id, r)
		}
	}
}

func checkAcceptedSubfolder(t *testing.T, sub string) {
	t.Helper()
	if len(sub) > MaxSubfolderLength || !utf8.ValidString(sub) || strings.ContainsAny(sub, "+#") {
		t.Fatalf("accepted subfolder %q", sub)
	}
	for _, level := range strings.Split(sub, "/") {
		if level == "" || level == "." || level == ".." {
			t.Fatalf("accepted subfolder %q with level %q", sub, level)
		}
	}
}

// FuzzParseTopic feeds ParseTopic arbitrary topics, as inbound messages bring
// them: it never panics, and what it splits it splits losslessly.
func FuzzParseTopic(f *testing.F) {
	for _, s := range []string{
		"/reg/dev/events", "/reg/dev/events/a/b", "/reg/gw/errors", "/reg/dev/commands", "/reg/dev/commands/x/y/z",
		"", "/", "//", "///", "/reg//events", "/reg/dev/", "/reg/dev/events/", "reg/dev/events", "/+/#/x", "/r/d/k//x",
		"/r/d/config\xff", "/\x00/\x00/\x00",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, topic string) {
		p, err := ParseTopic(topic)
		if err != nil {
			return
		}
		if p.Registry == "" || p.Device == "" || p.Kind == "" {
			t.Fatalf("ParseTopic(%q) = %+v without error", topic, p)
		}
		if strings.Contains(p.Registry, "/") || strings.Contains(p.Device, "/") || strings.Contains(string(p.Kind), "/") {
			t.Fatalf("ParseTopic(%q) = %+v: a part holds a level separator", topic, p)
		}
		if got := Topic(p.Registry, p.Device, p.Kind, p.Subfolder); got != topic {
			t.Fatalf("ParseTopic(%q) = %+v, which rebuilds as %q", topic, p, got)
		}
	})
}

// An error names the character that is not allowed, not the first byte of
// its encoding.
func TestValidateIDNamesTheCharacter(t *testing.T) {
	for id, char := range map[string]string{"dév": "'é'", "a\U0001F600": "'😀'", "a b": "' '"} {
		err := ValidateID(id)
		if err == nil || !strings.Contains(err.Error(), "contains "+char) {
			t.Errorf("ValidateID(%q) = %v, want it to name %s", id, err, char)
		}
	}
}
