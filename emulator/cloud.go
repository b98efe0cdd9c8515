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
	if len(payload) > omnicore.MaxConfigBytes {
		return 0, fmt.Errorf("%w: %d bytes", ErrConfigTooLarge, len(payload))
	}
	s.mu.Lock()
	dev, err := s.deviceLocked(registryID, deviceID)
	if err != nil {
		s.mu.Unlock()
		return 0, err
	}
	dev.config.version++
	dev.config.payload = slices.Clone(payload)
	dev.config.updated = time.Now()
	version := dev.config.version
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
	return version, nil
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
	dev := s.registries[c.registry].devices[deviceID]
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
	dev := s.registries[c.registry].devices[a.device]
	if dev != nil && a.version > dev.config.ackedVersion {
		dev.config.ackedVersion = a.version
		dev.config.acked = time.Now()
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
