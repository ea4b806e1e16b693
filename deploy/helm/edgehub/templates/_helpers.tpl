{{- define "edgehub.name" -}}edgehub{{- end -}}

{{- define "edgehub.labels" -}}
app.kubernetes.io/part-of: edgehub
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "edgehub.claim" -}}
{{- if .Values.persistence.existingClaim -}}{{ .Values.persistence.existingClaim }}{{- else -}}edgehub-data{{- end -}}
{{- end -}}

{{- define "edgehub.gateway" -}}
{{- if .Values.device.gatewayHostname -}}{{ .Values.device.gatewayHostname }}{{- else -}}edgehub.{{ .Release.Namespace }}.svc{{- end -}}
{{- end -}}
