package spool

// What Open does with damage it finds on disk: a torn tail truncated, a
// damaged segment set aside and rewritten with its intact records, an
// emptied one reported (recover in spool.go calls these).

import (
	"fmt"
	"os"
	"path/filepath"
)

// reportEmptied reports the segments found empty though later segments
// exist: they were sealed with records, which a crash of the filesystem
// (or a hand) took. Their number is estimated from the other segments.
func (s *Spool) reportEmptied(emptied []uint64) {
	if len(emptied) == 0 {
		return
	}
	var sealed, bytes int64
	var records int
	for _, seg := range s.segs {
		sealed = max(sealed, seg.size)
		bytes += seg.size - int64(headerSize)
		records += seg.records
	}
	for _, seq := range emptied {
		if records == 0 {
			s.opts.Log.Warnf("Spool segment %s was empty though later segments exist: its metrics were lost (how many is unknown: no other segment to estimate from)",
				segmentName(seq))
			continue
		}
		lost := (sealed - int64(headerSize)) * int64(records) / bytes
		s.stats.LostRecords += lost
		s.opts.Log.Warnf("Spool segment %s was empty though later segments exist: its metrics were lost, about %d (estimated from the other segments' sizes)",
			segmentName(seq), lost)
	}
}

// boundaryAt is the position of the first record boundary at or after off
// in the segment bytes data (valid records only).
func boundaryAt(data []byte, seq uint64, off int64) Position {
	p := Position{Seq: seq, Off: int64(headerSize)}
	for p.Off < off && p.Off < int64(len(data)) {
		_, _, size, err := decodeRecord(data[p.Off:])
		if err != nil {
			break
		}
		p.Off += int64(size)
		p.Index++
	}
	return p
}

// checkSegment checks one segment's bytes and repairs it: a torn tail of the
// last segment is truncated, any other damage sets the file aside and keeps
// its intact records (salvageSegment). It returns nil when nothing of the
// segment is left. A repair the disk refuses is reported and retried at the
// next Open; the undamaged prefix replays all the same. released is the
// release cursor's offset when it is in this segment (nil otherwise), which
// a repair may move.
func (s *Spool) checkSegment(path string, seq uint64, data []byte, last bool, released *int64) *segment {
	log := s.opts.Log
	r := scanSegment(data)
	switch {
	case r.problem == "":
	case len(data) == 0 || (r.torn && r.valid == 0):
		switch {
		case !last:
			// Reported with an estimate of what it held by reportEmptied.
		case len(data) > 0:
			log.Warnf("Spool segment %s has a torn header: removed it, dropping %d bytes", filepath.Base(path), len(data))
			s.stats.TruncatedBytes += int64(len(data))
		default:
			// Created but never written: a stop right after a rotation.
			log.Infof("Removed the empty spool segment %s", filepath.Base(path))
		}
		s.dirDirty = true
		if err := os.Remove(path); err != nil {
			s.diskFailedLocked("removing an empty spool segment", err)
		}
		return nil
	case r.torn && last:
		dropped := int64(len(data)) - r.valid
		log.Warnf("Spool segment %s ends with a torn record (an append cut short by a crash or power loss): truncated it, dropping %d bytes; its %d records before are kept",
			filepath.Base(path), dropped, r.records)
		s.stats.TruncatedBytes += dropped
		if err := os.Truncate(path, r.valid); err != nil {
			s.diskFailedLocked("truncating a torn spool segment", err)
		}
	default:
		return s.salvageSegment(path, seq, data, r, released)
	}
	return &segment{seq: seq, size: r.valid, records: r.records, firstMs: r.firstMs}
}

// salvageSegment sets a damaged segment aside (.corrupt, kept whole) and
// rewrites it with its intact records: those before the damage and those
// found after it, in order. Only the damaged stretches are lost, at least one
// metric each; records before the release cursor were delivered before the
// stop and are neither replayed nor counted lost. *released is moved to the
// rewritten file's coordinates.
func (s *Spool) salvageSegment(path string, seq uint64, data []byte, r scanResult, released *int64) *segment {
	// The damage stopped scanSegment at r.valid: a damaged record there
	// (at least one metric lost), or a damaged header (r.valid 0).
	var damagedAt []int
	if r.valid > 0 {
		damagedAt = []int{int(r.valid)}
	}
	spans, stretches := salvage(data, r.salvageFrom())
	damagedAt = append(damagedAt, stretches...)
	var cursor int64
	if released != nil {
		cursor = *released
		if cursor > r.valid {
			// Every record of the prefix was released; the rewritten file
			// has the intact records after the cursor right after it.
			*released = r.valid
		}
	}
	out := append([]byte(nil), data[:r.valid]...)
	if r.valid == 0 {
		out = append(out, segmentMagic...)
	}
	records, firstMs := r.records, r.firstMs
	after := 0
	for _, sp := range spans {
		if int64(sp.off) < cursor {
			continue // delivered before the stop
		}
		if records == 0 {
			_, firstMs, _, _ = decodeRecord(data[sp.off:])
		}
		out = append(out, data[sp.off:sp.off+sp.size]...)
		records++
		after++
	}
	lost := 0
	for _, at := range damagedAt {
		if int64(at) >= cursor {
			lost++
		}
	}

	aside := path + ".corrupt"
	what := fmt.Sprintf("Spool segment %s is damaged (%s): set it aside as %s; keeping its %d records before the damage and %d intact ones after it",
		filepath.Base(path), r.problem, filepath.Base(aside), r.records, after)
	if lost > 0 {
		s.opts.Log.Errorf("%s; at least %d metrics are lost, one per damaged stretch of the file", what, lost)
	} else {
		s.opts.Log.Warnf("%s; no metric is lost", what)
	}
	s.stats.CorruptSegments++
	s.stats.LostRecords += int64(lost)
	s.dirDirty = true
	if err := os.Rename(path, aside); err != nil {
		s.diskFailedLocked("setting a damaged spool segment aside", err)
		// The file is as it was: only its undamaged prefix can be read.
		if released != nil {
			*released = min(cursor, r.valid)
		}
		if r.records == 0 {
			return nil
		}
		return &segment{seq: seq, size: r.valid, records: r.records, firstMs: r.firstMs}
	}
	if records == 0 {
		return nil
	}
	if err := writeFileSync(path, out); err != nil {
		s.diskFailedLocked("rewriting a damaged spool segment", err)
	}
	return &segment{seq: seq, size: int64(len(out)), records: records, firstMs: firstMs}
}
