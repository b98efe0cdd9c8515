//go:build tools

package tools

import (
	_ "github.com/eclipse/paho.mqtt.golang"
	_ "github.com/golang-jwt/jwt/v5"
	_ "github.com/influxdata/telegraf"
	_ "github.com/influxdata/telegraf/plugins/common/shim"
	_ "github.com/mochi-mqtt/server/v2"
	_ "github.com/stretchr/testify/require"
)
