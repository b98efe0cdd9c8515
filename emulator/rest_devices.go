package emulator

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

type koreDeviceList struct {
	Devices    []json.RawMessage `json:"devices"`
	PageNumber int               `json:"pageNumber"`
	PageSize   int               `json:"pageSize"`
	TotalCount int               `json:"totalCount"`
}

type koreDeviceOnlineList struct {
	Devices    []koreDeviceOnline `json:"devices"`
	PageNumber int                `json:"pageNumber"`
	PageSize   int                `json:"pageSize"`
	TotalCount int                `json:"totalCount"`
}

// findLocked finds a device by ID or, for a number, by numId.
func (reg *registry) findLocked(idOrNum string) *device {
	if d := reg.devices[idOrNum]; d != nil {
		return d
	}
	if n, err := strconv.ParseInt(idOrNum, 10, 64); err == nil {
		for _, d := range reg.devices {
			if d.numID == n {
				return d
			}
		}
	}
	return nil
}

// deviceFilter is the list parameters of getDevices.
type deviceFilter struct {
	ids, numIDs               []string
	assocGateway, assocDevice string
	gatewayType               string
}

// parseDeviceList reads the paging and filter parameters of a device list.
func parseDeviceList(q url.Values) (page, deviceFilter, error) {
	p, err := parsePage(q)
	if err != nil {
		return p, deviceFilter{}, err
	}
	f, err := parseDeviceFilter(q)
	return p, f, err
}

func parseDeviceFilter(q url.Values) (deviceFilter, error) {
	var f deviceFilter
	var err error
	if f.ids, err = idList(q, "deviceIds"); err != nil {
		return f, err
	}
	if f.numIDs, err = idList(q, "deviceNumIds"); err != nil {
		return f, err
	}
	f.assocGateway = q.Get("gatewayListOptions.associationsGatewayId")
	f.assocDevice = q.Get("gatewayListOptions.associationsDeviceId")
	f.gatewayType = q.Get("gatewayListOptions.gatewayType")
	switch f.gatewayType {
	case "", "GATEWAY", "NON_GATEWAY", "GATEWAY_TYPE_UNSPECIFIED":
	default:
		return f, badRequest("gatewayListOptions.gatewayType must be GATEWAY, NON_GATEWAY or GATEWAY_TYPE_UNSPECIFIED")
	}
	if f.assocGateway != "" && f.assocDevice != "" {
		return f, badRequest("gatewayListOptions: give associationsGatewayId or associationsDeviceId, not both")
	}
	return f, nil
}

// matchLocked lists reg's devices that pass the filter, sorted by ID. strict
// makes an unknown association ID an error (within one registry).
func (f deviceFilter) matchLocked(reg *registry, strict bool) ([]*device, error) {
	var gw, dev *device
	if f.assocGateway != "" {
		if gw = reg.findLocked(f.assocGateway); gw == nil || !gw.Gateway {
			if strict {
				return nil, &restError{http.StatusNotFound, "NOT_FOUND", "gateway " + strconv.Quote(f.assocGateway) + " not found in registry " + strconv.Quote(reg.id)}
			}
			return nil, nil
		}
	}
	if f.assocDevice != "" {
		if dev = reg.findLocked(f.assocDevice); dev == nil {
			if strict {
				return nil, &restError{http.StatusNotFound, "NOT_FOUND", "device " + strconv.Quote(f.assocDevice) + " not found in registry " + strconv.Quote(reg.id)}
			}
			return nil, nil
		}
	}
	var out []*device
	for _, d := range reg.devices {
		switch {
		case len(f.ids) > 0 && !slices.Contains(f.ids, d.ID),
			len(f.numIDs) > 0 && !slices.Contains(f.numIDs, strconv.FormatInt(d.numID, 10)),
			f.gatewayType == "GATEWAY" && !d.Gateway,
			f.gatewayType == "NON_GATEWAY" && d.Gateway,
			gw != nil && !d.boundTo[gw.ID],
			dev != nil && !dev.boundTo[d.ID]:
			continue
		}
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b *device) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

func (s *Server) restListDevices(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	p, f, err := parseDeviceList(q)
	if err != nil {
		return err
	}
	mask, err := idList(q, "fieldMask")
	if err != nil {
		return err
	}
	s.mu.Lock()
	reg, ok := s.registries[r.PathValue("reg")]
	if !ok {
		s.mu.Unlock()
		return &restError{http.StatusNotFound, "NOT_FOUND", "registry " + strconv.Quote(r.PathValue("reg")) + " not found"}
	}
	devs, err := f.matchLocked(reg, true)
	li := s.liveIndexLocked()
	var views []koreDevice
	for _, d := range pageOf(devs, p) {
		views = append(views, s.koreDeviceLocked(reg, d, li))
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	list := koreDeviceList{Devices: []json.RawMessage{}, PageNumber: p.number, PageSize: p.size, TotalCount: len(devs)}
	for _, v := range views {
		raw, err := withFields(v, mask)
		if err != nil {
			return err
		}
		list.Devices = append(list.Devices, raw)
	}
	writeJSON(w, http.StatusOK, list)
	return nil
}

// withFields encodes a device with only id, numId and the top-level fields
// of mask (all fields when mask is empty), as KORE's fieldMask says.
func withFields(d koreDevice, mask []string) (json.RawMessage, error) {
	raw, err := json.Marshal(d)
	if err != nil || len(mask) == 0 {
		return raw, err
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(raw, &all); err != nil {
		return nil, err
	}
	keep := map[string]json.RawMessage{"id": all["id"], "numId": all["numId"]}
	for _, f := range mask {
		top, _, _ := strings.Cut(f, ".")
		if v, ok := all[top]; ok {
			keep[top] = v
		}
	}
	return json.Marshal(keep)
}

func (s *Server) restDevicesLastSeen(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	p, f, err := parseDeviceList(q)
	if err != nil {
		return err
	}
	online := q.Get("sortByClientOnline") == "true"
	s.mu.Lock()
	li := s.liveIndexLocked()
	all := []koreDeviceOnline{}
	for _, reg := range s.registries {
		devs, _ := f.matchLocked(reg, false)
		for _, d := range devs {
			k := reg.id + "/" + d.ID
			all = append(all, koreDeviceOnline{ID: d.ID, Registry: reg.id, ClientOnline: li.online[k], LastHeartbeatTime: koreTime(li.heartbeat[k]), Subscription: s.subscription})
		}
	}
	s.mu.Unlock()
	slices.SortStableFunc(all, func(a, b koreDeviceOnline) int {
		if online && a.ClientOnline != b.ClientOnline {
			if a.ClientOnline {
				return -1
			}
			return 1
		}
		// RFC 3339 in UTC sorts as text; latest first, never-seen last.
		if c := strings.Compare(b.LastHeartbeatTime, a.LastHeartbeatTime); c != 0 {
			return c
		}
		return strings.Compare(a.Registry+"/"+a.ID, b.Registry+"/"+b.ID)
	})
	writeJSON(w, http.StatusOK, koreDeviceOnlineList{Devices: pageOf(all, p), PageNumber: p.number, PageSize: p.size, TotalCount: len(all)})
	return nil
}

// readDevice reads a Device body in the emulator's terms.
func readDevice(w http.ResponseWriter, r *http.Request) (DeviceSpec, error) {
	var in koreDeviceIn
	if err := decodeBody(w, r, &in); err != nil {
		return DeviceSpec{}, err
	}
	spec, err := in.spec()
	if err != nil {
		return spec, badRequest(err.Error())
	}
	return spec, nil
}

func (s *Server) restCreateDevice(w http.ResponseWriter, r *http.Request) error {
	spec, err := readDevice(w, r)
	if err != nil {
		return err
	}
	if err := s.CreateDevice(r.PathValue("reg"), spec); err != nil {
		return err
	}
	return s.writeDevice(w, r.PathValue("reg"), spec.ID)
}

func (s *Server) restGetDevice(w http.ResponseWriter, r *http.Request) error {
	return s.writeDevice(w, r.PathValue("reg"), r.PathValue("dev"))
}

func (s *Server) writeDevice(w http.ResponseWriter, registryID, deviceID string) error {
	s.mu.Lock()
	dev, err := s.deviceLocked(registryID, deviceID)
	var kd koreDevice
	if err == nil {
		kd = s.koreDeviceLocked(s.registries[registryID], dev, s.liveIndexLocked())
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, kd)
	return nil
}

func (s *Server) restUpdateDevice(w http.ResponseWriter, r *http.Request) error {
	mask, err := idList(r.URL.Query(), "updateMask")
	if err != nil {
		return err
	}
	spec, err := readDevice(w, r)
	if err != nil {
		return err
	}
	if err := s.UpdateDevice(r.PathValue("reg"), r.PathValue("dev"), mask, spec); err != nil {
		return err
	}
	return s.writeDevice(w, r.PathValue("reg"), r.PathValue("dev"))
}

func (s *Server) restDeleteDevice(w http.ResponseWriter, r *http.Request) error {
	if err := s.DeleteDevice(r.PathValue("reg"), r.PathValue("dev")); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}

// restBind serves the four bind and unbind operations.
func (s *Server) restBind(bound, plural bool) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		var in struct {
			GatewayID string   `json:"gatewayId"`
			DeviceID  string   `json:"deviceId"`
			DeviceIDs []string `json:"deviceIds"`
		}
		if err := decodeBody(w, r, &in); err != nil {
			return err
		}
		ids := in.DeviceIDs
		if !plural {
			ids = []string{in.DeviceID}
		}
		if in.GatewayID == "" || slices.Contains(ids, "") || len(ids) == 0 {
			if plural {
				return badRequest("gatewayId and deviceIds are required")
			}
			return badRequest("gatewayId and deviceId are required")
		}
		if len(ids) > maxListIDs {
			return badRequest("deviceIds: more than " + strconv.Itoa(maxListIDs) + " IDs")
		}
		if err := s.SetBindings(r.PathValue("reg"), in.GatewayID, ids, bound); err != nil {
			return err
		}
		verb := "bound to"
		if !bound {
			verb = "unbound from"
		}
		writeJSON(w, http.StatusOK, koreInfo{strings.Join(ids, ",") + " " + verb + " " + in.GatewayID})
		return nil
	}
}

func (s *Server) restCommunication(w http.ResponseWriter, r *http.Request) error {
	var in struct {
		IsBlocked *bool `json:"isblocked"`
	}
	if err := decodeBody(w, r, &in); err != nil {
		return err
	}
	if in.IsBlocked == nil {
		return badRequest("isblocked is required")
	}
	if err := s.BlockDevice(r.PathValue("reg"), r.PathValue("dev"), *in.IsBlocked); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}

// binaryBody is KORE's DeviceConfiguration and DeviceCommand.
type binaryBody struct {
	BinaryData      *string `json:"binaryData"`
	Subfolder       string  `json:"subfolder"`
	VersionToUpdate string  `json:"versionToUpdate"`
}

func (b binaryBody) payload(limit int) ([]byte, error) {
	if b.BinaryData == nil {
		return nil, badRequest("binaryData is required")
	}
	data, err := base64.StdEncoding.DecodeString(*b.BinaryData)
	if err != nil {
		return nil, badRequest("binaryData is not base64: " + err.Error())
	}
	if len(data) > limit {
		return nil, badRequest("binaryData holds " + strconv.Itoa(len(data)) + " bytes, at most " + strconv.Itoa(limit))
	}
	return data, nil
}

// readBinary reads a DeviceConfiguration or DeviceCommand body and its payload.
func readBinary(w http.ResponseWriter, r *http.Request) (binaryBody, []byte, error) {
	var in binaryBody
	if err := decodeBody(w, r, &in); err != nil {
		return in, nil, err
	}
	data, err := in.payload(maxAdminBody)
	return in, data, err
}

func (s *Server) restUpdateConfig(w http.ResponseWriter, r *http.Request) error {
	in, data, err := readBinary(w, r)
	if err != nil {
		return err
	}
	ifVersion := 0
	if in.VersionToUpdate != "" {
		if ifVersion, err = strconv.Atoi(in.VersionToUpdate); err != nil || ifVersion < 0 {
			return badRequest("versionToUpdate must be a non-negative integer")
		}
	}
	cv, err := s.UpdateConfig(r.PathValue("reg"), r.PathValue("dev"), data, ifVersion)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, koreConfigOf(cv))
	return nil
}

func (s *Server) restSendCommand(w http.ResponseWriter, r *http.Request) error {
	in, data, err := readBinary(w, r)
	if err != nil {
		return err
	}
	if err := s.SendCommand(r.PathValue("reg"), r.PathValue("dev"), in.Subfolder, data); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}

func (s *Server) restBroadcast(w http.ResponseWriter, r *http.Request) error {
	in, data, err := readBinary(w, r)
	if err != nil {
		return err
	}
	if _, err := s.Broadcast(r.PathValue("reg"), in.Subfolder, data); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}

// restHistory serves configVersions and states: the device's latest items,
// newest first, at most the count parameter (0 or absent: all kept).
func restHistory[T, J any](param, field string, list func(reg, dev string, n int) ([]T, error), view func(T) J) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		n, err := queryInt(r.URL.Query().Get(param), 0, 0, 1<<30)
		if err != nil {
			return badRequest(param + " must be a non-negative integer")
		}
		items, err := list(r.PathValue("reg"), r.PathValue("dev"), n)
		if err != nil {
			return err
		}
		out := make([]J, 0, len(items))
		for _, it := range items {
			out = append(out, view(it))
		}
		writeJSON(w, http.StatusOK, map[string][]J{field: out})
		return nil
	}
}
