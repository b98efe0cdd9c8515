package emulator

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// RegistrySettings are the fields of KORE's DeviceRegistry that a client
// sets. The emulator stores and returns them; it acts on none (there is no
// Pub/Sub or Kinesis to notify, and no HTTP bridge), and it refuses
// MQTT_DISABLED rather than keep a setting it would not honour.
type RegistrySettings struct {
	Credentials                     json.RawMessage `json:"credentials,omitempty"`
	HTTPConfig                      *HTTPConfig     `json:"httpConfig,omitempty"`
	MQTTConfig                      *MQTTConfig     `json:"mqttConfig,omitempty"`
	LogLevel                        string          `json:"logLevel,omitempty"`
	IsNatsRoute                     *bool           `json:"isNatsRoute,omitempty"`
	EventNotificationConfigs        json.RawMessage `json:"eventNotificationConfigs,omitempty"`
	LogNotificationConfig           json.RawMessage `json:"logNotificationConfig,omitempty"`
	StateNotificationConfig         json.RawMessage `json:"stateNotificationConfig,omitempty"`
	CustomOnboardNotificationConfig json.RawMessage `json:"customOnboardNotificationConfig,omitempty"`
	CustomOnboardEnabled            *bool           `json:"customOnboardEnabled,omitempty"`
	RouteTarget                     string          `json:"routeTarget,omitempty"`
}

// MQTTConfig is KORE's registry mqttConfig.
type MQTTConfig struct {
	MQTTEnabledState string `json:"mqttEnabledState,omitempty"`
}

// HTTPConfig is KORE's registry httpConfig.
type HTTPConfig struct {
	HTTPEnabledState string `json:"httpEnabledState,omitempty"`
}

func (r RegistrySettings) validate() error {
	if r.MQTTConfig != nil {
		switch r.MQTTConfig.MQTTEnabledState {
		case "", "MQTT_ENABLED", "MQTT_STATE_UNSPECIFIED":
		case "MQTT_DISABLED":
			return errors.New("mqttConfig.mqttEnabledState MQTT_DISABLED is not emulated: the emulator is an MQTT bridge")
		default:
			return fmt.Errorf("mqttConfig.mqttEnabledState %s is not MQTT_ENABLED, MQTT_DISABLED or MQTT_STATE_UNSPECIFIED", trunc(r.MQTTConfig.MQTTEnabledState))
		}
	}
	if r.HTTPConfig != nil {
		switch r.HTTPConfig.HTTPEnabledState {
		case "", "HTTP_ENABLED", "HTTP_DISABLED", "HTTP_STATE_UNSPECIFIED":
		default:
			return fmt.Errorf("httpConfig.httpEnabledState %s is not HTTP_ENABLED, HTTP_DISABLED or HTTP_STATE_UNSPECIFIED", trunc(r.HTTPConfig.HTTPEnabledState))
		}
	}
	switch r.RouteTarget {
	case "", "pubsub", "kinesis":
	default:
		return fmt.Errorf("routeTarget %s is not pubsub or kinesis", trunc(r.RouteTarget))
	}
	return validLogLevel(r.LogLevel)
}

// CreateRegistry creates an empty registry with KORE's settings.
func (s *Server) CreateRegistry(id string, settings RegistrySettings) error {
	if err := omnicore.ValidateID(id); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := settings.validate(); err != nil {
		return err
	}
	now := time.Now()
	s.mu.Lock()
	if _, ok := s.registries[id]; ok {
		s.mu.Unlock()
		return fmt.Errorf("registry %q: %w", id, ErrExists)
	}
	s.registries[id] = &registry{id: id, created: now, updated: now, settings: settings, devices: map[string]*device{}}
	s.notifyLocked()
	s.mu.Unlock()
	return s.save()
}

// UpdateRegistry sets the settings mask names (KORE's updateMask values) to
// in's values.
func (s *Server) UpdateRegistry(id string, mask []string, in RegistrySettings) error {
	if len(mask) == 0 {
		return errors.New("updateMask is required")
	}
	s.mu.Lock()
	reg, ok := s.registries[id]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("registry %q: %w", id, ErrNotFound)
	}
	if err := applyRegistryMask(&reg.settings, mask, in); err != nil {
		s.mu.Unlock()
		return err
	}
	reg.updated = time.Now()
	s.notifyLocked()
	s.mu.Unlock()
	return s.save()
}

// applyRegistryMask changes the fields mask names in cur, or nothing on error.
func applyRegistryMask(settings *RegistrySettings, mask []string, in RegistrySettings) error {
	cur := *settings
	for _, f := range mask {
		switch f {
		case "eventNotificationConfigs":
			cur.EventNotificationConfigs = in.EventNotificationConfigs
		case "stateNotificationConfig.pubsub_topic_name":
			cur.StateNotificationConfig = in.StateNotificationConfig
		case "logNotificationConfig.pubsub_topic_name":
			cur.LogNotificationConfig = in.LogNotificationConfig
		case "customOnboardNotificationConfig.pubsub_topic_name":
			cur.CustomOnboardNotificationConfig = in.CustomOnboardNotificationConfig
		case "customOnboardEnabled":
			cur.CustomOnboardEnabled = in.CustomOnboardEnabled
		case "mqttConfig.mqtt_enabled_state":
			cur.MQTTConfig = in.MQTTConfig
		case "httpConfig.http_enabled_state":
			cur.HTTPConfig = in.HTTPConfig
		case "logLevel":
			cur.LogLevel = in.LogLevel
		case "credentials":
			cur.Credentials = in.Credentials
		default:
			return fmt.Errorf("updateMask: %s is not a registry field that can be updated", trunc(f))
		}
	}
	if err := cur.validate(); err != nil {
		return err
	}
	*settings = cur
	return nil
}

// DeleteRegistry deletes an empty registry.
func (s *Server) DeleteRegistry(id string) error {
	s.mu.Lock()
	reg, ok := s.registries[id]
	switch {
	case !ok:
		s.mu.Unlock()
		return fmt.Errorf("registry %q: %w", id, ErrNotFound)
	case len(reg.devices) > 0:
		s.mu.Unlock()
		return fmt.Errorf("registry %q: %w (%d): delete them first", id, ErrNotEmpty, len(reg.devices))
	}
	delete(s.registries, id)
	s.notifyLocked()
	s.mu.Unlock()
	return s.save()
}
