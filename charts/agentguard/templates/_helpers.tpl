{{/* Name of every object; agentguard's built-in rules protect cluster-scoped objects with this prefix. */}}
{{- define "agentguard.name" -}}agentguard{{- end -}}

{{- define "agentguard.labels" -}}
app.kubernetes.io/name: agentguard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentguard.selector" -}}
app.kubernetes.io/name: agentguard
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Secret holding the serving certificate: cert-manager's, the user's, or agentguard's own. */}}
{{- define "agentguard.tlsSecret" -}}
{{- if .Values.tls.existingSecret -}}{{ .Values.tls.existingSecret }}{{- else -}}agentguard-tls{{- end -}}
{{- end -}}

{{/* True when agentguard makes its own certificates. */}}
{{- define "agentguard.selfSigned" -}}
{{- if and (not .Values.certManager.enabled) (not .Values.tls.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* Must equal webhook::guard_condition() for the default labels (a unit test checks it). */}}
{{- define "agentguard.guardCondition" -}}
(object != null && has(object.metadata) && has(object.metadata.annotations) && object.metadata.annotations.exists(k, (k == 'agentguard.io/approve' || k.startsWith('agentguard.io/approve.')) && (oldObject == null || !has(oldObject.metadata.annotations) || !(k in oldObject.metadata.annotations) || oldObject.metadata.annotations[k] != object.metadata.annotations[k]))) || (request.resource.group == '' && request.resource.resource in ['serviceaccounts', 'namespaces'] && object != null && ['agentguard.io/agent', 'agentguard.io/agent-namespace'].exists(k, (object != null && has(object.metadata.labels) && k in object.metadata.labels ? object.metadata.labels[k] : '') != (oldObject != null && has(oldObject.metadata.labels) && k in oldObject.metadata.labels ? oldObject.metadata.labels[k] : ''))) || (request.operation == 'CREATE' && request.resource.group == 'agentguard.io' && request.resource.resource == 'agentsessions')
{{- end -}}

{{/* The core kinds agentguard reads by default: every one the API serves, Secrets only when asked. */}}
{{- define "agentguard.readableCore" -}}
{{- $core := list "configmaps" "endpoints" "events" "limitranges" "namespaces" "nodes" "persistentvolumeclaims" "persistentvolumes" "pods" "podtemplates" "replicationcontrollers" "resourcequotas" "serviceaccounts" "services" -}}
{{- if .Values.readSecrets }}{{ $core = append $core "secrets" }}{{ end -}}
{{- $core | sortAlpha | toJson -}}
{{- end -}}

{{/* Every API group but the core one that the cluster serves (Helm's view at render time:
     "group/version" and "group/version/Kind" entries; core entries start with a version). */}}
{{- define "agentguard.readableGroups" -}}
{{- $groups := dict "agentguard.io" true -}}
{{- range .Capabilities.APIVersions -}}
{{- $first := first (splitList "/" .) -}}
{{- if not (regexMatch "^v[0-9]+((alpha|beta)[0-9]+)?$" $first) -}}
{{- $_ := set $groups $first true -}}
{{- end -}}
{{- end -}}
{{- keys $groups | sortAlpha | toJson -}}
{{- end -}}
