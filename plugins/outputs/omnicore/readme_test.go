package omnicore

import (
	"os"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf/config"
	_ "github.com/influxdata/telegraf/plugins/outputs/execd" // for the execd wiring the README documents

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
)

func readme(t *testing.T) string {
	t.Helper()
	buf, err := os.ReadFile("README.md")
	require.NoError(t, err)
	return string(buf)
}

// TestReadmeConfigIsSampleConf: the README's configuration block is
// sample.conf, as readme_config_includer would make it.
func TestReadmeConfigIsSampleConf(t *testing.T) {
	block := regexp.MustCompile("(?s)```toml @sample.conf\n(.*?)```").FindStringSubmatch(readme(t))
	require.NotNil(t, block, "no ```toml @sample.conf block in README.md")
	require.Equal(t, sampleConfig, block[1])
}

// TestReadmeExecdWiring loads the [[outputs.execd]] table the README
// documents with Telegraf's config loader, which rejects unknown keys: it is
// accepted, and the signal option (valid only for inputs.execd) is not.
func TestReadmeExecdWiring(t *testing.T) {
	block := regexp.MustCompile("(?s)```toml\n(\\[\\[outputs\\.execd\\]\\].*?)```").FindStringSubmatch(readme(t))
	require.NotNil(t, block, "no [[outputs.execd]] block in README.md")
	require.Contains(t, block[1], `command = ["/usr/bin/telegraf-omnicore", "-config", "/etc/telegraf/omnicore/output.conf"]`)
	require.Contains(t, block[1], `restart_delay = "10s"`)

	tests := []struct {
		name    string
		conf    string
		wantErr string
	}{
		{name: "as documented", conf: block[1]},
		{name: "with signal", conf: block[1] + "  signal = \"none\"\n", wantErr: `"signal"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := config.NewConfig()
			err := c.LoadConfigData([]byte(tt.conf), config.EmptySourcePath)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Len(t, c.Outputs, 1)
			require.Equal(t, "execd", c.Outputs[0].Config.Name)
		})
	}
}

// TestReadmeRoutingExample publishes the README's routing example and
// compares with the topics and payloads it shows.
func TestReadmeRoutingExample(t *testing.T) {
	re := regexp.MustCompile("(?s)For example, with `subfolder = \"\\{\\{ \\.Name \\}\\}\"` and `state_metrics = \\[\"status\"\\]`,\nthese metrics\n\n```text\n(.*?)```\n\nare published as\n\n```text\n(.*?)```")
	parts := re.FindStringSubmatch(readme(t))
	require.NotNil(t, parts, "routing example not found in README.md")

	conn := gatewaytest.New("gw")
	o := newPlugin(t, conn, func(o *OmniCore) {
		o.Subfolder = "{{ .Name }}"
		o.StateMetrics = []string{"status"}
	})
	require.NoError(t, o.Write(parse(t, []byte(parts[1]))))

	var got []string
	for _, msg := range conn.Published() {
		topic := "/my-registry/" + msg.Device + "/" + string(msg.Kind)
		if msg.Subfolder != "" {
			topic += "/" + msg.Subfolder
		}
		got = append(got, topic+" "+string(msg.Payload))
	}
	var want []string
	for _, line := range regexp.MustCompile(`(?m)^(\S+)\s+(.*)$`).FindAllStringSubmatch(parts[2], -1) {
		want = append(want, line[1]+" "+line[2]+"\n")
	}
	require.ElementsMatch(t, want, got)
}
