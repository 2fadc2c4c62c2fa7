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

{{/* Where the gateway finds its members when no backendUrl is set: the value, else this chart's
vLLM pods through their headless Service's DNS records. */}}
{{- define "vllm-gateway.backendDiscovery" -}}
{{- $g := .Values.gateway }}
{{- if $g.backendDiscovery }}
{{- $g.backendDiscovery }}
{{- else if .Values.vllm.enabled }}
{{- printf "dns://%s.%s.svc.%s:%v" (include "vllm-gateway.vllmName" .) .Release.Namespace $g.clusterDomain .Values.vllm.port }}
{{- else }}
{{- fail "gateway.backendUrl or gateway.backendDiscovery is required when vllm.enabled is false" }}
{{- end }}
{{- end }}

{{/* The gateway pods, each by its own address (a headless Service): what vLLM's preStop asks. */}}
{{- define "vllm-gateway.gatewayPodsName" -}}
{{- printf "%s-pods" (include "vllm-gateway.gatewayName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* vLLM's preStop wait: the gateways see the pod gone from DNS, then its drain deadline passes. */}}
{{- define "vllm-gateway.vllmDrainSeconds" -}}
{{- add (int .Values.vllm.dnsLagSeconds) (int (ceil (float64 .Values.gateway.drainTimeoutSeconds))) }}
{{- end }}

{{- define "vllm-gateway.vllmGracePeriod" -}}
{{- add (int (include "vllm-gateway.vllmDrainSeconds" .)) (int .Values.vllm.terminationGraceMarginSeconds) }}
{{- end }}

{{/* The kubelet's SIGKILL must come after preStop + the whole drain: sum them, plus a margin. */}}
{{- define "vllm-gateway.gatewayGracePeriod" -}}
{{- $g := .Values.gateway }}
{{- add (int $g.preStopSleepSeconds) (int (ceil (float64 $g.shutdownTimeoutSeconds))) (int $g.terminationGraceMarginSeconds) }}
{{- end }}

{{- define "vllm-gateway.adminKeysSecret" -}}
{{- if .Values.gateway.adminApiKeys.existingSecret }}
{{- .Values.gateway.adminApiKeys.existingSecret }}
{{- else if .Values.gateway.adminApiKeys.values }}
{{- printf "%s-admin-api-keys" (include "vllm-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{- define "vllm-gateway.apiKeysSecret" -}}
{{- if .Values.gateway.apiKeys.existingSecret }}
{{- .Values.gateway.apiKeys.existingSecret }}
{{- else if .Values.gateway.apiKeys.values }}
{{- printf "%s-api-keys" (include "vllm-gateway.fullname" .) }}
{{- end }}
{{- end }}
