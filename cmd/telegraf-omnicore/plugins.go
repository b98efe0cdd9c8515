package main

// The plugins this program runs; a plugin file names one of them.
import (
	_ "github.com/telegraf-omnicore/telegraf-omnicore/plugins/inputs/omnicore"
	_ "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)
