package main

// The data formats and secret stores a plugin file can use. Telegraf's config
// loader finds them in its registries, which hold only what is imported.
import (
	// Serializers for the output's data_format.
	_ "github.com/influxdata/telegraf/plugins/serializers/carbon2"
	_ "github.com/influxdata/telegraf/plugins/serializers/csv"
	_ "github.com/influxdata/telegraf/plugins/serializers/graphite"
	_ "github.com/influxdata/telegraf/plugins/serializers/influx"
	_ "github.com/influxdata/telegraf/plugins/serializers/json"
	_ "github.com/influxdata/telegraf/plugins/serializers/nowmetric"
	_ "github.com/influxdata/telegraf/plugins/serializers/splunkmetric"
	_ "github.com/influxdata/telegraf/plugins/serializers/wavefront"

	// Parsers for the input's data_format.
	_ "github.com/influxdata/telegraf/plugins/parsers/csv"
	_ "github.com/influxdata/telegraf/plugins/parsers/influx"
	_ "github.com/influxdata/telegraf/plugins/parsers/json"
	_ "github.com/influxdata/telegraf/plugins/parsers/value"

	// Secret stores: [[secretstores.docker]] reads one file per secret from
	// a directory, which also serves systemd credentials
	// (path = "${CREDENTIALS_DIRECTORY}").
	_ "github.com/influxdata/telegraf/plugins/secretstores/docker"
)
