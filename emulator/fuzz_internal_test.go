package emulator

import (
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// The parsers that see client input must never panic, whatever the bytes.

func FuzzParseAttachPayload(f *testing.F) {
	for _, s := range []string{"", "{}", `{"authorization":""}`, `{"authorization":"a.b.c"}`, "{", "[]", `{"authorization":5}`, "null", " \n{} "} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		authz, err := parseAttachPayload(payload)
		if err != nil && authz != "" {
			t.Fatalf("error %v with authorization %q", err, authz)
		}
	})
}

func FuzzTopicChecks(f *testing.F) {
	for _, s := range []string{"/reg/gw/events", "/reg/gw/events/a/b", "/reg/dev/config", "/reg/dev/commands/#", "/reg/gw/errors", "#", "/", "//", "/reg//events", "/reg/gw/events/..", "$SYS/x", "/reg/+/state", "/reg/gw/attach/x"} {
		f.Add(s, byte(1))
	}
	rules := DefaultRules()
	f.Fuzz(func(t *testing.T, topic string, qos byte) {
		c := &conn{registry: "reg", device: "gw", gateway: true, attached: map[string]time.Time{}}
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos % 4}, TopicName: topic}
		reason, _ := c.checkPublish(pk, &rules)
		dev, kind, bad := c.classifyFilter(topic)
		if bad == "" && (dev == "" || kind == "") {
			t.Fatalf("accepted filter %q without device or kind", topic)
		}
		_ = reason
	})
}
