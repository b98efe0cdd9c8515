package emulator

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

// KORE's device-manager REST API, on the emulator's registry: the paths,
// verbs, JSON shapes, paging and error bodies of KORE's OpenAPI description.
// docs/bridge.md lists the choices made where the description is silent.

const (
	restBase = "/omnicore/subscriptions/{sub}"
	restReg  = restBase + "/registries/{reg}"
	restDev  = restReg + "/devices/{dev}"

	// maxRESTBody bounds request bodies: a command's binaryData is the
	// base64 of up to 256 KB; a device with three certificates and full
	// metadata is below 1 MiB too.
	maxRESTBody = 1 << 20

	defaultPageSize = 100
	maxPageSize     = 1000
	maxListIDs      = 10000 // KORE's limit of deviceIds and registryIds
)

// restRoutes adds the REST API to mux. Every handler returns an error
// instead of writing one, so that all errors have KORE's shape.
func (s *Server) restRoutes(mux *http.ServeMux) {
	route := func(pattern, op string, h func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			if sub := r.PathValue("sub"); sub != s.subscription {
				writeKoreError(w, op, &restError{http.StatusNotFound, "NOT_FOUND", "subscription " + strconv.Quote(sub) + " not found: the emulator runs " + strconv.Quote(s.subscription)})
				return
			}
			if err := h(w, r); err != nil {
				writeKoreError(w, op, err)
			}
		})
	}
	route("GET "+restBase+"/registries", "getRegistries", s.restListRegistries)
	route("POST "+restBase+"/registries", "createRegistry", s.restCreateRegistry)
	route("GET "+restReg, "getRegistry", s.restGetRegistry)
	route("PATCH "+restReg, "updateRegistry", s.restUpdateRegistry)
	route("DELETE "+restReg, "deleteRegistry", s.restDeleteRegistry)
	route("GET "+restBase+"/devices", "getDevicesLastSeen", s.restDevicesLastSeen)
	route("GET "+restReg+"/devices", "getDevices", s.restListDevices)
	route("POST "+restReg+"/devices", "createDevice", s.restCreateDevice)
	route("GET "+restDev, "getDevice", s.restGetDevice)
	route("PATCH "+restDev, "updateDevice", s.restUpdateDevice)
	route("DELETE "+restDev, "deleteDevice", s.restDeleteDevice)
	route("POST "+restReg+"/bindDeviceToGateway", "bindDevice", s.restBind(true, false))
	route("POST "+restReg+"/bindDevicesToGateway", "bindDevices", s.restBind(true, true))
	route("POST "+restReg+"/unbindDeviceFromGateway", "unBindDevice", s.restBind(false, false))
	route("POST "+restReg+"/unbindDevicesFromGateway", "unBindDevices", s.restBind(false, true))
	route("PUT "+restDev+"/communication", "blockDeviceCommuncation", s.restCommunication)
	route("GET "+restDev+"/configVersions", "getConfig", restHistory("numVersions", "deviceConfigs", s.ConfigVersions, koreConfigOf))
	route("POST "+restDev+"/updateConfigurationToDevice", "updateConfigurationToDevice", s.restUpdateConfig)
	route("POST "+restDev+"/sendCommandToDevice", "sendCommandToDevice", s.restSendCommand)
	route("POST "+restReg+"/sendBroadcastToDevice", "sendBroadcastToDevices", s.restBroadcast)
	route("GET "+restDev+"/states", "getStates", restHistory("numStates", "deviceStates", s.States, koreStateOf))
	mux.HandleFunc("/omnicore/", func(w http.ResponseWriter, r *http.Request) {
		writeKoreError(w, "", &restError{http.StatusNotFound, "NOT_FOUND", r.Method + " " + r.URL.Path + " is not part of the emulated API"})
	})
}

// restError is an error with its HTTP status and KORE status name.
type restError struct {
	code   int
	status string
	msg    string
}

func (e *restError) Error() string { return e.msg }

func badRequest(msg string) error { return &restError{http.StatusBadRequest, "INVALID_ARGUMENT", msg} }

// koreErrorBody is KORE's GenericErrorResponse.
type koreErrorBody struct {
	Error koreErrorFrame `json:"error"`
}

type koreErrorFrame struct {
	Code    int    `json:"code"`
	Details string `json:"details"` // the operation (KORE's operationId) that failed
	Message string `json:"message"`
	Status  string `json:"status"`
}

func writeKoreError(w http.ResponseWriter, op string, err error) {
	frame := koreErrorFrame{Details: op, Message: err.Error()}
	var re *restError
	switch {
	case errors.As(err, &re):
		frame.Code, frame.Status = re.code, re.status
	case errors.Is(err, ErrNotFound):
		frame.Code, frame.Status = http.StatusNotFound, "NOT_FOUND"
	case errors.Is(err, ErrExists):
		frame.Code, frame.Status = http.StatusConflict, "ALREADY_EXISTS"
	case errors.Is(err, ErrNotSubscribed), errors.Is(err, ErrVersionMismatch), errors.Is(err, ErrNotEmpty):
		frame.Code, frame.Status = http.StatusBadRequest, "FAILED_PRECONDITION"
	case errors.Is(err, ErrNotSaved):
		frame.Code, frame.Status = http.StatusInternalServerError, "INTERNAL"
	default:
		frame.Code, frame.Status = http.StatusBadRequest, "INVALID_ARGUMENT"
	}
	if frame.Code == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="omnicore-emulator"`)
	}
	writeJSON(w, frame.Code, koreErrorBody{frame})
}

// decodeBody reads a JSON body of at most maxRESTBody bytes into v.
// Unknown fields are ignored, as KORE's read-only fields must be.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRESTBody))
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return &restError{http.StatusRequestEntityTooLarge, "RESOURCE_EXHAUSTED", "body larger than " + strconv.Itoa(maxRESTBody) + " bytes"}
	case err != nil:
		return badRequest(err.Error())
	case len(strings.TrimSpace(string(data))) == 0:
		return badRequest("a JSON body is required")
	}
	if err := json.Unmarshal(data, v); err != nil {
		return badRequest("body: " + err.Error())
	}
	return nil
}

// page is KORE's pageNumber (from 1) and pageSize.
type page struct{ number, size int }

func parsePage(q url.Values) (page, error) {
	number, err := queryInt(q.Get("pageNumber"), 1, 0, 1<<30)
	if err != nil {
		return page{}, badRequest("pageNumber must be a positive integer")
	}
	size, err := queryInt(q.Get("pageSize"), defaultPageSize, 0, maxPageSize)
	if err != nil {
		return page{}, badRequest("pageSize must be an integer from 0 to " + strconv.Itoa(maxPageSize))
	}
	return page{number: max(number, 1), size: cmpOr(size, defaultPageSize)}, nil
}

func cmpOr(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

func pageOf[T any](all []T, p page) []T {
	start := min((p.number-1)*p.size, len(all))
	return slices.Clone(all[start:min(start+p.size, len(all))])
}

// idList reads a list query parameter: comma-separated (KORE's explode:
// false) or repeated.
func idList(q url.Values, name string) ([]string, error) {
	var out []string
	for _, v := range q[name] {
		for _, id := range strings.Split(v, ",") {
			if id = strings.TrimSpace(id); id != "" {
				out = append(out, id)
			}
		}
	}
	if len(out) > maxListIDs {
		return nil, badRequest(name + ": more than " + strconv.Itoa(maxListIDs) + " IDs")
	}
	return out, nil
}

// --- registries -----------------------------------------------------------

type koreRegistryList struct {
	DeviceRegistries []koreRegistry `json:"deviceRegistries"`
	PageNumber       int            `json:"pageNumber"`
	PageSize         int            `json:"pageSize"`
	TotalCount       int            `json:"totalCount"`
}

func (s *Server) restListRegistries(w http.ResponseWriter, r *http.Request) error {
	p, err := parsePage(r.URL.Query())
	if err != nil {
		return err
	}
	ids, err := idList(r.URL.Query(), "registryIds")
	if err != nil {
		return err
	}
	s.mu.Lock()
	all := []koreRegistry{}
	for _, reg := range s.registries {
		if len(ids) == 0 || slices.Contains(ids, reg.id) {
			all = append(all, s.koreRegistryLocked(reg))
		}
	}
	s.mu.Unlock()
	slices.SortFunc(all, func(a, b koreRegistry) int { return strings.Compare(a.ID, b.ID) })
	writeJSON(w, http.StatusOK, koreRegistryList{DeviceRegistries: pageOf(all, p), PageNumber: p.number, PageSize: p.size, TotalCount: len(all)})
	return nil
}

func (s *Server) restCreateRegistry(w http.ResponseWriter, r *http.Request) error {
	var in koreRegistryIn
	if err := decodeBody(w, r, &in); err != nil {
		return err
	}
	if err := s.CreateRegistry(in.ID, in.RegistrySettings); err != nil {
		return err
	}
	return s.writeRegistry(w, in.ID)
}

func (s *Server) restGetRegistry(w http.ResponseWriter, r *http.Request) error {
	return s.writeRegistry(w, r.PathValue("reg"))
}

func (s *Server) writeRegistry(w http.ResponseWriter, id string) error {
	s.mu.Lock()
	reg, ok := s.registries[id]
	var kr koreRegistry
	if ok {
		kr = s.koreRegistryLocked(reg)
	}
	s.mu.Unlock()
	if !ok {
		return &restError{http.StatusNotFound, "NOT_FOUND", "registry " + strconv.Quote(id) + " not found"}
	}
	writeJSON(w, http.StatusOK, kr)
	return nil
}

func (s *Server) restUpdateRegistry(w http.ResponseWriter, r *http.Request) error {
	mask, err := idList(r.URL.Query(), "updateMask")
	if err != nil {
		return err
	}
	var in koreRegistryIn
	if err := decodeBody(w, r, &in); err != nil {
		return err
	}
	if err := s.UpdateRegistry(r.PathValue("reg"), mask, in.RegistrySettings); err != nil {
		return err
	}
	return s.writeRegistry(w, r.PathValue("reg"))
}

func (s *Server) restDeleteRegistry(w http.ResponseWriter, r *http.Request) error {
	if err := s.DeleteRegistry(r.PathValue("reg")); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, koreInfo{"registry " + r.PathValue("reg") + " deleted"})
	return nil
}

// koreInfo is KORE's Info answer.
type koreInfo struct {
	Info string `json:"info"`
}
