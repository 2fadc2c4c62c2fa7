{{/* Names, labels and derived values shared by the templates. */}}

{{- define "vllm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "vllm-gateway.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "vllm-gateway.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "vllm-gateway.vllmName" -}}
{{- printf "%s-vllm" (include "vllm-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-gateway.gatewayName" -}}
{{- include "vllm-gateway.fullname" . }}
{{- end }}

{{- define "vllm-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "vllm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vllm-gateway.gatewaySelector" -}}
app.kubernetes.io/name: {{ include "vllm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "vllm-gateway.vllmSelector" -}}
app.kubernetes.io/name: {{ include "vllm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: vllm
{{- end }}

{{/* Where the gateway sends requests: the value if set, else this chart's vLLM Service. */}}
{{- define "vllm-gateway.backendUrl" -}}
{{- if .Values.gateway.backendUrl }}
{{- .Values.gateway.backendUrl }}
{{- else if .Values.vllm.enabled }}
{{- printf "http://%s:%v" (include "vllm-gateway.vllmName" .) .Values.vllm.port }}
{{- else }}
{{- fail "gateway.backendUrl is required when vllm.enabled is false" }}
{{- end }}
{{- end }}

{{/* The kubelet's SIGKILL must come after preStop + the whole drain: sum them, plus a margin. */}}
{{- define "vllm-gateway.gatewayGracePeriod" -}}
{{- $g := .Values.gateway }}
{{- add (int $g.preStopSleepSeconds) (int (ceil (float64 $g.shutdownTimeoutSeconds))) (int $g.terminationGraceMarginSeconds) }}
{{- end }}

{{- define "vllm-gateway.apiKeysSecret" -}}
{{- if .Values.gateway.apiKeys.existingSecret }}
{{- .Values.gateway.apiKeys.existingSecret }}
{{- else if .Values.gateway.apiKeys.values }}
{{- printf "%s-api-keys" (include "vllm-gateway.fullname" .) }}
{{- end }}
{{- end }}
