package emulator

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// KORE's JSON shapes, as its OpenAPI description (api/openapi.yaml of
// korewireless/OmniCore-Go-SDK) names them. Read-only fields a client sends
// are ignored; fields the emulator has nothing for are left out.

type koreRegistry struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Parent    string `json:"parent"`
	CreatedOn string `json:"createdOn"`
	UpdatedOn string `json:"updatedOn"`
	RegistrySettings
	NumberOfDevices  int `json:"numberOfDevices"`
	NumberOfGateways int `json:"numberOfGateways"`
}

type koreRegistryIn struct {
	ID string `json:"id"`
	RegistrySettings
}

type koreGatewayConfig struct {
	GatewayType       string `json:"gatewayType"`
	GatewayAuthMethod string `json:"gatewayAuthMethod"`
}

type korePublicKey struct {
	Format string `json:"format"`
	Key    string `json:"key"`
}

type koreCredential struct {
	ExpirationTime string        `json:"expirationTime,omitempty"`
	ID             string        `json:"id,omitempty"`
	PublicKey      korePublicKey `json:"publicKey"`
}

type koreConfig struct {
	Version         int    `json:"version"`
	CloudUpdateTime string `json:"cloudUpdateTime"`
	DeviceAckTime   string `json:"deviceAckTime,omitempty"`
	BinaryData      string `json:"binaryData"`
	Acknowledged    bool   `json:"acknowledged"`
}

type koreState struct {
	BinaryData string `json:"binaryData"`
	UpdateTime string `json:"updateTime"`
}

type koreDevice struct {
	ID                string            `json:"id"`
	Name              string            `json:"name"`
	NumID             string            `json:"numId"`
	Parent            string            `json:"parent"`
	Registry          string            `json:"registry"`
	Subscription      string            `json:"subscription"`
	Blocked           bool              `json:"blocked"`
	CreatedOn         string            `json:"createdOn"`
	UpdatedOn         string            `json:"updatedOn"`
	Credentials       []koreCredential  `json:"credentials"`
	Gateway           []string          `json:"gateway"`
	GatewayConfig     koreGatewayConfig `json:"gatewayConfig"`
	IsGateway         bool              `json:"isGateway"`
	ClientOnline      bool              `json:"clientOnline"`
	LastConfigAckTime string            `json:"lastConfigAckTime,omitempty"`
	LastEventTime     string            `json:"lastEventTime,omitempty"`
	LastHeartbeatTime string            `json:"lastHeartbeatTime,omitempty"`
	LastStateTime     string            `json:"lastStateTime,omitempty"`
	LogLevel          string            `json:"logLevel,omitempty"`
	Metadata          map[string]string `json:"metadata,omitempty"`
	Config            *koreConfig       `json:"config,omitempty"`
	State             *koreState        `json:"state,omitempty"`
	Policy            json.RawMessage   `json:"policy,omitempty"`
}

type koreDeviceOnline struct {
	ID                string `json:"id"`
	Registry          string `json:"registry"`
	ClientOnline      bool   `json:"clientOnline"`
	LastHeartbeatTime string `json:"lastHeartbeatTime,omitempty"`
	Subscription      string `json:"subscription"`
}

type koreDeviceIn struct {
	ID            string             `json:"id"`
	Blocked       bool               `json:"blocked"`
	Credentials   []koreCredential   `json:"credentials"`
	Gateway       []string           `json:"gateway"`
	GatewayConfig *koreGatewayConfig `json:"gatewayConfig"`
	IsGateway     *bool              `json:"isGateway"`
	LogLevel      string             `json:"logLevel"`
	Metadata      map[string]string  `json:"metadata"`
	Policy        json.RawMessage    `json:"policy"`
}

// koreTime is KORE's timestamp: RFC 3339 in UTC, "" for never.
func koreTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// spec turns a device body into the emulator's terms.
func (in koreDeviceIn) spec() (DeviceSpec, error) {
	spec := DeviceSpec{Device: Device{ID: in.ID, Blocked: in.Blocked}, BoundTo: in.Gateway}
	gc := in.GatewayConfig
	if gc == nil {
		gc = &koreGatewayConfig{}
	}
	switch gc.GatewayType {
	case "GATEWAY":
		spec.Gateway = true
	case "", "NON_GATEWAY", "GATEWAY_TYPE_UNSPECIFIED":
	default:
		return spec, fmt.Errorf("gatewayConfig.gatewayType %s is not GATEWAY or NON_GATEWAY", trunc(gc.GatewayType))
	}
	if in.IsGateway != nil {
		if gc.GatewayType != "" && gc.GatewayType != "GATEWAY_TYPE_UNSPECIFIED" && *in.IsGateway != spec.Gateway {
			return spec, fmt.Errorf("isGateway %t contradicts gatewayConfig.gatewayType %s", *in.IsGateway, gc.GatewayType)
		}
		spec.Gateway = *in.IsGateway
	}
	if m := gc.GatewayAuthMethod; m != "" && m != "GATEWAY_AUTH_METHOD_UNSPECIFIED" {
		spec.AuthMethod = AuthMethod(m)
	}
	for i, c := range in.Credentials {
		if c.PublicKey.Format == "" {
			return spec, fmt.Errorf("credentials[%d].publicKey.format is required", i)
		}
		k := PublicKey{Format: c.PublicKey.Format, PEM: []byte(c.PublicKey.Key)}
		if c.ExpirationTime != "" {
			t, err := time.Parse(time.RFC3339Nano, c.ExpirationTime)
			if err != nil {
				return spec, fmt.Errorf("credentials[%d].expirationTime is not an RFC 3339 time: %s", i, trunc(c.ExpirationTime))
			}
			k.Expires = t
		}
		spec.PublicKeys = append(spec.PublicKeys, k)
	}
	spec.Meta = DeviceMeta{Metadata: in.Metadata, LogLevel: in.LogLevel}
	if len(in.Policy) > 0 && string(in.Policy) != "null" {
		spec.Meta.Policy = in.Policy
	}
	return spec, nil
}

// liveIndex is who is online now, for the device views.
type liveIndex struct {
	online    map[string]bool      // "reg/dev": own connection or attached
	heartbeat map[string]time.Time // "reg/dev": last packet on its own connection
}

func (s *Server) liveIndexLocked() liveIndex {
	li := liveIndex{online: map[string]bool{}, heartbeat: map[string]time.Time{}}
	for _, c := range s.conns {
		k := c.registry + "/" + c.device
		li.online[k] = true
		li.heartbeat[k] = time.Unix(0, c.lastActivity.Load())
		for d := range c.attached {
			li.online[c.registry+"/"+d] = true
		}
	}
	return li
}

// koreDeviceLocked is a device as KORE's API shows it.
func (s *Server) koreDeviceLocked(reg *registry, d *device, li liveIndex) koreDevice {
	k := reg.id + "/" + d.ID
	kd := koreDevice{
		ID: d.ID, Name: s.ClientID(reg.id, d.ID), NumID: strconv.FormatInt(d.numID, 10),
		Parent: "subscriptions/" + s.subscription + "/registries/" + reg.id, Registry: reg.id,
		Subscription: s.subscription, Blocked: d.Blocked,
		CreatedOn: koreTime(d.created), UpdatedOn: koreTime(d.updated),
		Credentials:   []koreCredential{},
		Gateway:       []string{},
		GatewayConfig: koreGatewayConfig{GatewayType: "NON_GATEWAY", GatewayAuthMethod: "GATEWAY_AUTH_METHOD_UNSPECIFIED"},
		IsGateway:     d.Gateway, ClientOnline: li.online[k],
		LastConfigAckTime: koreTime(d.config.acked), LastEventTime: koreTime(d.lastEvent),
		LastHeartbeatTime: koreTime(li.heartbeat[k]), LastStateTime: koreTime(d.lastState),
		LogLevel: d.meta.LogLevel, Metadata: d.meta.Metadata, Policy: d.meta.Policy,
	}
	if d.Gateway {
		kd.GatewayConfig = koreGatewayConfig{GatewayType: "GATEWAY", GatewayAuthMethod: string(d.AuthMethod)}
		for _, other := range reg.devices {
			if other.boundTo[d.ID] {
				kd.Gateway = append(kd.Gateway, other.ID)
			}
		}
	} else {
		for gw := range d.boundTo {
			kd.Gateway = append(kd.Gateway, gw)
		}
	}
	kd.Gateway = sortedCopy(kd.Gateway)
	if kd.Gateway == nil {
		kd.Gateway = []string{}
	}
	for _, pk := range d.PublicKeys {
		sum := sha256.Sum256(pk.PEM)
		kd.Credentials = append(kd.Credentials, koreCredential{
			ID: hex.EncodeToString(sum[:8]), ExpirationTime: koreTime(pk.Expires),
			PublicKey: korePublicKey{Format: pk.Format, Key: string(pk.PEM)},
		})
	}
	if h := d.config.history; len(h) > 0 {
		c := koreConfigOf(h[len(h)-1])
		kd.Config = &c
	}
	if n := len(d.states); n > 0 {
		st := koreStateOf(d.states[n-1])
		kd.State = &st
	}
	return kd
}

func koreConfigOf(cv ConfigVersion) koreConfig {
	return koreConfig{
		Version: cv.Version, CloudUpdateTime: koreTime(cv.Updated), DeviceAckTime: koreTime(cv.Acked),
		BinaryData: base64.StdEncoding.EncodeToString(cv.Payload), Acknowledged: !cv.Acked.IsZero(),
	}
}

func koreStateOf(st DeviceState) koreState {
	return koreState{BinaryData: base64.StdEncoding.EncodeToString(st.Payload), UpdateTime: koreTime(st.Time)}
}

func (s *Server) koreRegistryLocked(reg *registry) koreRegistry {
	kr := koreRegistry{
		ID: reg.id, Name: "subscriptions/" + s.subscription + "/registries/" + reg.id,
		Parent: "subscriptions/" + s.subscription, CreatedOn: koreTime(reg.created), UpdatedOn: koreTime(reg.updated),
		RegistrySettings: reg.settings,
	}
	for _, d := range reg.devices {
		if d.Gateway {
			kr.NumberOfGateways++
		} else {
			kr.NumberOfDevices++
		}
	}
	return kr
}
