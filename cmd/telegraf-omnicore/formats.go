package main

// The data formats and secret stores a plugin file can use. Telegraf's config
// loader finds them in its registries, which hold only what is imported.
import (
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/influxdata/telegraf/plugins/parsers"
	"github.com/influxdata/telegraf/plugins/serializers"

	// Serializers for the output's data_format.
	_ "github.com/influxdata/telegraf/plugins/serializers/binary"
	_ "github.com/influxdata/telegraf/plugins/serializers/carbon2"
	_ "github.com/influxdata/telegraf/plugins/serializers/csv"
	_ "github.com/influxdata/telegraf/plugins/serializers/graphite"
	_ "github.com/influxdata/telegraf/plugins/serializers/influx"
	_ "github.com/influxdata/telegraf/plugins/serializers/json"
	_ "github.com/influxdata/telegraf/plugins/serializers/msgpack"
	_ "github.com/influxdata/telegraf/plugins/serializers/nowmetric"
	_ "github.com/influxdata/telegraf/plugins/serializers/splunkmetric"
	_ "github.com/influxdata/telegraf/plugins/serializers/template"
	_ "github.com/influxdata/telegraf/plugins/serializers/wavefront"

	// Parsers for the input's data_format. xpath registers xml,
	// xpath_json, xpath_msgpack, xpath_protobuf and xpath_cbor.
	_ "github.com/influxdata/telegraf/plugins/parsers/binary"
	_ "github.com/influxdata/telegraf/plugins/parsers/csv"
	_ "github.com/influxdata/telegraf/plugins/parsers/influx"
	_ "github.com/influxdata/telegraf/plugins/parsers/json"
	_ "github.com/influxdata/telegraf/plugins/parsers/json_v2"
	_ "github.com/influxdata/telegraf/plugins/parsers/value"
	_ "github.com/influxdata/telegraf/plugins/parsers/xpath"

	// Secret stores: [[secretstores.docker]] reads one file per secret from
	// a directory, which also serves systemd credentials
	// (path = "${CREDENTIALS_DIRECTORY}").
	_ "github.com/influxdata/telegraf/plugins/secretstores/docker"
)

// formatList names the registered data formats of a registry, sorted.
func formatList[T any](registry map[string]T) string {
	names := make([]string, 0, len(registry))
	for name := range registry {
		names = append(names, name)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// dataFormatValue finds the data_format value of a plugin file, for error
// messages only ("" when it is not a plain string).
var dataFormatValue = regexp.MustCompile(`(?m)^\s*data_format\s*=\s*"([^"]*)"`)

// unknownFormatError rewrites the config loader's error for a data_format
// that is not built in into one that lists the formats that are; nil for
// other errors.
func unknownFormatError(err error, data []byte) error {
	msg := err.Error()
	if strings.HasSuffix(msg, "parser not found") {
		// The loader's probe for a ParserFuncPlugin (inputs.omnicore)
		// does not name the format.
		name := ""
		if m := dataFormatValue.FindSubmatch(data); m != nil {
			name = string(m[1])
		}
		return fmt.Errorf("data_format %q is not built in; the parsers built in are: %s", name, formatList(parsers.Parsers))
	}
	for _, f := range []struct {
		marker, what, list string
	}{
		{"undefined but requested parser: ", "parsers", formatList(parsers.Parsers)},
		{"undefined but requested serializer: ", "serializers", formatList(serializers.Serializers)},
	} {
		if i := strings.Index(msg, f.marker); i >= 0 {
			name := strings.TrimSpace(msg[i+len(f.marker):])
			return fmt.Errorf("data_format %q is not built in; the %s built in are: %s", name, f.what, f.list)
		}
	}
	return nil
}
