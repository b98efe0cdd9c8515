package emulator

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// ErrConfigTooLarge is returned by SetConfig for a payload over 64 KB.
var ErrConfigTooLarge = errors.New("config is larger than 64 KB")

// SetConfig stores a new config version for a device and delivers it at once
// to every live connection subscribed to that device's config (the device's
// own, or a gateway it is attached to). Later config subscriptions receive it
// right after their SUBACK. It returns the new version (1, 2, ...).
func (s *Server) SetConfig(registryID, deviceID string, payload []byte) (int, error) {
	cv, err := s.UpdateConfig(registryID, deviceID, payload, 0)
	return cv.Version, err
}

// UpdateConfig is SetConfig with KORE's versionToUpdate: when ifVersion is
// not 0 and not the device's latest version, nothing changes and it returns
// ErrVersionMismatch.
func (s *Server) UpdateConfig(registryID, deviceID string, payload []byte, ifVersion int) (ConfigVersion, error) {
	if len(payload) > omnicore.MaxConfigBytes {
		return ConfigVersion{}, fmt.Errorf("%w: %d bytes", ErrConfigTooLarge, len(payload))
	}
	s.mu.Lock()
	dev, err := s.deviceLocked(registryID, deviceID)
	if err != nil {
		s.mu.Unlock()
		return ConfigVersion{}, err
	}
	if ifVersion != 0 && ifVersion != dev.config.version {
		s.mu.Unlock()
		return ConfigVersion{}, fmt.Errorf("%w: versionToUpdate %d, the latest is %d", ErrVersionMismatch, ifVersion, dev.config.version)
	}
	cv := dev.config.push(payload, time.Now())
	var targets []*conn
	for _, c := range s.conns {
		if c.registry == registryID && c.subscribedLocked(deviceID, omnicore.KindConfig) >= 0 {
			targets = append(targets, c)
		}
	}
	s.notifyLocked()
	s.mu.Unlock()
	for _, c := range targets {
		s.deliverConfig(c, deviceID, false)
	}
	return cv, s.save()
}

// push stores a new config version, keeping the latest maxConfigVersionsKept.
func (cs *configState) push(payload []byte, now time.Time) ConfigVersion {
	cs.version++
	cs.payload = slices.Clone(payload)
	cs.updated = now
	if len(cs.history) >= maxConfigVersionsKept {
		cs.history = slices.Delete(cs.history, 0, len(cs.history)-maxConfigVersionsKept+1)
	}
	cv := ConfigVersion{Version: cs.version, Payload: cs.payload, Updated: now}
	cs.history = append(cs.history, cv)
	return cv
}

// deliverConfig sends a device's latest config on one connection. force is
// set for the delivery that follows a SUBACK (always sent, empty when there is
// no config and EmptyConfigOnSubscribe is on); otherwise only a version newer
// than the one last delivered there is sent, so that two concurrent SetConfig
// calls can never leave an older config as the last one a client sees.
func (s *Server) deliverConfig(c *conn, deviceID string, force bool) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	s.deliverConfigHeld(c, deviceID, force)
}

// deliverConfigHeld is deliverConfig with c.writeMu already held.
func (s *Server) deliverConfigHeld(c *conn, deviceID string, force bool) {
	s.mu.Lock()
	ds := c.subs[deviceID]
	dev := s.lookupLocked(c.registry, deviceID)
	if ds == nil || ds.config < 0 || dev == nil {
		s.mu.Unlock()
		return
	}
	cfg := dev.config
	switch {
	case cfg.version == 0 && (!force || !s.rules.Load().EmptyConfigOnSubscribe):
		s.mu.Unlock()
		return
	case !force && ds.configSent >= cfg.version:
		s.mu.Unlock()
		return
	}
	ds.configSent = cfg.version
	qos := byte(min(ds.config, 1))
	s.mu.Unlock()

	topic := omnicore.Topic(c.registry, deviceID, omnicore.KindConfig, "")
	var id uint16
	if qos == 1 {
		var err error
		if id, err = c.nextPacketID(); err != nil {
			return
		}
	}
	// The delivery is registered and counted before the packet is written:
	// the client's PUBACK can come back (and be read on the connection's
	// goroutine) before the write returns, and a PUBACK that finds nothing is
	// ignored.
	s.mu.Lock()
	if qos == 1 && cfg.version > 0 {
		if len(c.outstanding) > 1024 { // a client that never acknowledges
			clear(c.outstanding)
		}
		c.outstanding[id] = configAck{device: deviceID, version: cfg.version}
	}
	s.stats.ConfigsDelivered++
	s.notifyLocked()
	s.mu.Unlock()

	if err := c.publishID(topic, cfg.payload, qos, id); err != nil {
		// The failed write closed the connection: nothing was delivered.
		s.mu.Lock()
		if qos == 1 {
			delete(c.outstanding, id)
		}
		s.stats.ConfigsDelivered--
		s.mu.Unlock()
	}
}

// configAcked records a client's PUBACK of a config delivery, like the
// bridge's deviceAckTime.
func (s *Server) configAcked(c *conn, id uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a, ok := c.outstanding[id]
	if !ok {
		return
	}
	delete(c.outstanding, id)
	dev := s.lookupLocked(c.registry, a.device)
	if dev != nil && a.version > dev.config.ackedVersion {
		now := time.Now()
		dev.config.ackedVersion = a.version
		dev.config.acked = now
		for i := range dev.config.history {
			if h := &dev.config.history[i]; h.Version == a.version && h.Acked.IsZero() {
				h.Acked = now
			}
		}
		s.notifyLocked()
	}
}

// SendCommand delivers a command to every live connection subscribed to the
// device's commands/# (topic /{reg}/{dev}/commands or .../commands/{subfolder}),
// at the subscription's QoS (at most 1). Commands are not stored: with no
// such connection it returns ErrNotSubscribed, like the bridge's
// FAILED_PRECONDITION.
func (s *Server) SendCommand(registryID, deviceID, subfolder string, payload []byte) error {
	if subfolder != "" {
		if err := omnicore.ValidateSubfolder(subfolder); err != nil {
			return err
		}
	}
	type target struct {
		c   *conn
		qos byte
	}
	s.mu.Lock()
	if _, err := s.deviceLocked(registryID, deviceID); err != nil {
		s.mu.Unlock()
		return err
	}
	var targets []target
	for _, c := range s.conns {
		if c.registry != registryID {
			continue
		}
		if q := c.subscribedLocked(deviceID, omnicore.KindCommands); q >= 0 {
			targets = append(targets, target{c, byte(min(q, 1))})
		}
	}
	s.mu.Unlock()
	if len(targets) == 0 {
		return ErrNotSubscribed
	}
	topic := omnicore.Topic(registryID, deviceID, omnicore.KindCommands, subfolder)
	delivered := 0
	var lastErr error
	for _, t := range targets {
		// Counted before the write, like every delivery: a client that has
		// the command never finds Stats().CommandsDelivered behind.
		s.mu.Lock()
		s.stats.CommandsDelivered++
		s.notifyLocked()
		s.mu.Unlock()
		t.c.writeMu.Lock()
		_, err := t.c.publish(topic, slices.Clone(payload), t.qos)
		t.c.writeMu.Unlock()
		if err != nil {
			s.mu.Lock()
			s.stats.CommandsDelivered--
			s.mu.Unlock()
			lastErr = err
			continue
		}
		delivered++
	}
	if delivered == 0 {
		return fmt.Errorf("%w: %v", ErrNotSubscribed, lastErr)
	}
	return nil
}

// Broadcast sends a command to every device of the registry that a live
// connection has subscribed to commands/# for (on each device's commands
// topic, as SendCommand does) and returns how many deliveries it made; none
// is not an error. The bridge's broadcast topic is unknown, so this is the
// emulator's stand-in for KORE's sendBroadcastToDevice.
func (s *Server) Broadcast(registryID, subfolder string, payload []byte) (int, error) {
	if subfolder != "" {
		if err := omnicore.ValidateSubfolder(subfolder); err != nil {
			return 0, err
		}
	}
	s.mu.Lock()
	if _, ok := s.registries[registryID]; !ok {
		s.mu.Unlock()
		return 0, fmt.Errorf("registry %q: %w", registryID, ErrNotFound)
	}
	devices := map[string]bool{}
	for _, c := range s.conns {
		if c.registry != registryID {
			continue
		}
		for dev, ds := range c.subs {
			if ds.commands >= 0 {
				devices[dev] = true
			}
		}
	}
	s.mu.Unlock()
	n := 0
	for dev := range devices {
		if err := s.SendCommand(registryID, dev, subfolder, payload); err == nil {
			n++
		}
	}
	return n, nil
}
